"""Attachments made safe and useful before they leave the practice.

A phone photo carries more than the lesion: GPS coordinates of the patient's home, the
device's serial number, sometimes a thumbnail of the uncropped scene. Everything but the
pixels (and the colour profile, which dermatology needs) is dropped here, the EXIF
orientation is applied so the specialist does not see the wound sideways, and the size is
bounded. Photo quality is checked at once, because two thirds of the requests that end
without a diagnosis failed on poor photos: a warning now saves a round trip of days.

Files are recognised by their content, never by their name. Images go through Pillow
under a pixel bound (a 100 000 x 100 000 header must not allocate 30 GB); PDFs must
parse and have pages; anything else (DICOM, text, ...) travels unchanged.

Errors: every refusal is a :class:`MediaError` (code ``bad_attachment``), with an English
message and a French one (``message_fr``) that tell the practitioner what to do.
"""

from __future__ import annotations

import io
import mimetypes
import os
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps, ImageStat, UnidentifiedImageError
from pypdf import PdfReader

from client.home import atomic_write
from protocol.errors import PliError

__all__ = [
    "BLUR_THRESHOLD",
    "DARK_THRESHOLD",
    "MAX_PDF_BYTES",
    "MAX_PIXELS",
    "MIN_LONG_SIDE",
    "OVEREXPOSED_THRESHOLD",
    "MediaError",
    "Prepared",
    "PreparedPhoto",
    "check_pdf",
    "prepare_attachment",
    "prepare_photo",
]

# Phones' usual modes give 12 to 50 MP and dermatoscopes less; the 108 and 200 MP modes some phones offer are
# refused, with advice to use the usual one. Decoding 80 MP takes 240 MB; Pillow's own default is 89 MP.
MAX_PIXELS = 80_000_000
MAX_PDF_BYTES = 200 << 20  # a scanned 300-page file fits; pypdf's work grows with the size, so it is bounded
MIN_LONG_SIDE = 1000  # under this, a lesion's border or a wound's edge cannot be judged when zoomed
# Variance of a 3x3 Laplacian on the photo's grayscale downscaled to 512 px. A synthetic skin-like scene
# (blotches and hairs, 1200 to 4000 px wide) scores 120 to 300 sharp and 1 to 5 after GaussianBlur(4)
# (2000 px or less); low-contrast sharp scenes still score about 20. 12 sits between, on the side of
# silence: a warning that fires on good photos teaches people to ignore it.
BLUR_THRESHOLD = 12.0
# Mean luminance (0-255). Phone auto-exposure aims near 118; under 45 is more than a stop and a half
# under, even allowing for a dermatoscope's black vignette (about 40 % of the frame). Over 230 the
# highlights are blown: texture and colour of the skin are lost.
DARK_THRESHOLD = 45.0
OVEREXPOSED_THRESHOLD = 230.0

_BLUR_WORK_SIDE = 512
_JPEG_QUALITY = 90
_THUMB_QUALITY = 80
_CHUNK = 1 << 20

# Formats Pillow decodes itself. Others it knows (EPS runs Ghostscript, for one) are not worth the risk.
_SAFE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
_LOSSY_FORMATS = frozenset({"JPEG", "MPO", "WEBP", "AVIF"})  # re-encoded as JPEG; the rest stay lossless (PNG)
_PNG_MODES = frozenset({"L", "LA", "RGB", "RGBA", "I;16"})
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1")
# Types whose name a wrong content must not wear: they are sniffed here, so the name is checked against them.
_SNIFFED_TYPES = frozenset(
    {
        "image/jpeg",
        "image/png",
        "image/webp",
        "image/gif",
        "image/bmp",
        "image/tiff",
        "image/avif",
        "image/heic",
        "image/heif",
        "application/pdf",
    }
)
_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the picture a quarter
_LAPLACIAN = ImageFilter.Kernel((3, 3), (0, 1, 0, 1, -4, 1, 0, 1, 0), scale=1, offset=128)


class MediaError(PliError):
    """An attachment that cannot be sent as it is; ``message_fr`` says the same in French."""

    code = "bad_attachment"

    def __init__(self, message: str, *, fr: str) -> None:
        super().__init__(message)
        self.message_fr = fr


@dataclass(frozen=True)
class PreparedPhoto:
    """A cleaned photo ready to attach, and what its quality check found.

    ``original_size`` is the source file's size in bytes; ``original_width`` and
    ``original_height`` its pixel size once the orientation is applied. ``sharpness`` and
    ``brightness`` are the raw measures behind the warnings, for a UI that wants a gauge.
    """

    path: Path
    thumbnail: Path
    width: int
    height: int
    media_type: str
    original_size: int
    original_width: int
    original_height: int
    sharpness: float
    brightness: float
    warnings: tuple[str, ...]
    warnings_fr: tuple[str, ...]


@dataclass(frozen=True)
class Prepared:
    """Any attachment ready to go: ``path`` is what to send under ``name``."""

    name: str
    path: Path
    media_type: str
    size: int
    thumbnail: Path | None = None
    pages: int | None = None
    warnings: tuple[str, ...] = ()
    warnings_fr: tuple[str, ...] = ()


def _check_regular_file(path: Path) -> int:
    """The file's size; a missing, folder or empty path is refused with what to do instead."""
    if path.is_dir():
        raise MediaError(
            f"{path.name} is a folder: attach the files inside it one by one.",
            fr=f"{path.name} est un dossier : joignez les fichiers qu'il contient un par un.",
        )
    try:
        size = path.stat().st_size
    except OSError as e:
        raise MediaError(
            f"{path.name} cannot be read ({e.strerror}): check the file is still there.",
            fr=f"{path.name} est illisible ({e.strerror}) : vérifiez que le fichier existe toujours.",
        ) from e
    if size == 0:
        raise MediaError(
            f"{path.name} is empty: save or export it again, then attach the new file.",
            fr=f"{path.name} est vide : enregistrez-le ou exportez-le à nouveau, puis joignez le nouveau fichier.",
        )
    return size


def _head(path: Path, n: int = 256) -> bytes:
    with path.open("rb") as f:
        return f.read(n)


def _is_heif(head: bytes) -> bool:
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


def _heif_error(name: str) -> MediaError:
    return MediaError(
        f"{name} is a HEIC photo (iPhone format), which cannot be read here: convert it to JPEG "
        "(on the iPhone: Settings > Camera > Formats > Most Compatible) and attach it again.",
        fr=f"{name} est une photo HEIC (format iPhone), illisible ici : convertissez-la en JPEG "
        "(sur l'iPhone : Réglages > Appareil photo > Formats > Le plus compatible) et joignez-la à nouveau.",
    )


@dataclass(frozen=True)
class _Decoded:
    image: Image.Image  # upright, possibly decoded at a reduced scale (JPEG draft)
    format: str
    icc: bytes | None
    width: int  # as taken, upright
    height: int


def _open_bounded(src: Path, *, max_pixels: int, max_side: int) -> _Decoded:
    """Decode ``src`` under the pixel bound, upright, with its format, ICC profile and full upright size.

    The pixel count is checked on the header, before a byte of pixel data is decoded.
    """
    name = src.name
    too_big = MediaError(
        f"{name} claims more than {max_pixels // 1_000_000} megapixels, more than a photo needs: it cannot be sent. "
        "Take the photo again with the phone or camera's usual settings.",
        fr=f"{name} annonce plus de {max_pixels // 1_000_000} mégapixels, plus qu'il n'en faut : il ne peut pas "
        "être envoyé. Reprenez la photo avec les réglages habituels du téléphone ou de l'appareil.",
    )
    Image.init()
    formats = [f for f in _SAFE_FORMATS if f in Image.OPEN]
    with warnings.catch_warnings():
        # Pillow's own bound (global, settable by anyone) warns, then raises: both become our error. The filter
        # is process-wide, so a thread may miss it; the explicit pixel check below does not depend on it.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(src, formats=formats)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise too_big from e
        except UnidentifiedImageError as e:
            if _is_heif(_head(src)):
                raise _heif_error(name) from e
            raise MediaError(
                f"{name} is not an image that can be read (JPEG, PNG or WebP expected): "
                "export the photo again as JPEG and attach it.",
                fr=f"{name} n'est pas une image lisible (JPEG, PNG ou WebP attendu) : "
                "exportez à nouveau la photo en JPEG et joignez-la.",
            ) from e
        except OSError as e:
            raise MediaError(
                f"{name} cannot be read ({e}): check the file is still there.",
                fr=f"{name} est illisible ({e}) : vérifiez que le fichier existe toujours.",
            ) from e
        with im:
            if im.width * im.height > max_pixels:
                raise too_big
            if getattr(im, "n_frames", 1) > 1 and im.format != "MPO":  # MPO: a JPEG plus a depth map or preview
                raise MediaError(
                    f"{name} holds several images (an animation or a multi-page scan): "
                    "send a still photo, or a multi-page document as a PDF.",
                    fr=f"{name} contient plusieurs images (animation ou numérisation de plusieurs pages) : "
                    "envoyez une photo fixe, ou un document de plusieurs pages en PDF.",
                )
            fmt = im.format or ""
            icc = im.info.get("icc_profile") or None
            try:
                orientation = im.getexif().get(_ORIENTATION_TAG, 1)
                width, height = (im.height, im.width) if orientation in _SWAPS_AXES else im.size
                longest = max(im.size)
                if longest > 2 * max_side:
                    # libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below the target: a 50 MP photo
                    # then needs a quarter of the memory. A no-op for other formats.
                    im.draft(None, (max(1, im.width * max_side // longest), max(1, im.height * max_side // longest)))
                upright = ImageOps.exif_transpose(im)  # decodes the pixels
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise too_big from e
            except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
                raise MediaError(
                    f"{name} is damaged or incomplete ({e}): copy it again from the phone or camera.",
                    fr=f"{name} est endommagé ou incomplet ({e}) : copiez-le à nouveau depuis le téléphone "
                    "ou l'appareil.",
                ) from e
    return _Decoded(upright, fmt, icc if isinstance(icc, bytes) else None, width, height)


def _family(mode: str) -> str:
    """Which colour space a mode's pixels live in: an ICC profile is only valid within one."""
    if mode in {"1", "L", "LA", "La", "I", "I;16", "F"}:
        return "gray"
    if mode in {"RGB", "RGBA", "RGBa", "RGBX", "P", "PA"}:
        return "rgb"
    return mode


def _flatten(im: Image.Image) -> Image.Image:
    """RGB (or L) pixels for JPEG: transparency composited on white, as a viewer shows it."""
    if im.mode in {"L", "RGB"}:
        return im
    if im.mode in {"1", "I", "I;16", "F"}:
        return _to_l(im)
    if im.mode in {"LA", "PA", "RGBA"} or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def _for_png(im: Image.Image) -> Image.Image:
    if im.mode in _PNG_MODES:
        return im
    if im.mode == "I":
        return im.convert("I;16")
    if im.mode in {"1", "F"}:
        return _to_l(im)
    if im.mode == "PA" or (im.mode == "P" and "transparency" in im.info):
        return im.convert("RGBA")
    return im.convert("RGB")


def _to_l(im: Image.Image) -> Image.Image:
    """8-bit grayscale; 16-bit samples are scaled, not clipped (Pillow's convert("L") clips them)."""
    if im.mode in {"I", "I;16"}:
        return im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return im.convert("L")


def _quality(im: Image.Image) -> tuple[float, float]:
    """Sharpness (variance of a Laplacian on a 512 px grayscale) and mean luminance (0-255)."""
    gray = _to_l(im)
    brightness = float(ImageStat.Stat(gray).mean[0])
    if max(gray.size) > _BLUR_WORK_SIDE:
        gray = gray.copy()
        gray.thumbnail((_BLUR_WORK_SIDE, _BLUR_WORK_SIDE), Image.Resampling.BOX)
    if min(gray.size) < 3:
        return 0.0, brightness
    lap = gray.filter(_LAPLACIAN).crop((1, 1, gray.width - 1, gray.height - 1))  # the border sees padding
    return float(ImageStat.Stat(lap).var[0]), brightness


def _warnings(width: int, height: int, sharpness: float, brightness: float) -> tuple[list[str], list[str]]:
    en: list[str] = []
    fr: list[str] = []
    if max(width, height) < MIN_LONG_SIDE:
        en.append(
            f"The photo is small ({width}x{height} px): the specialist may not see enough detail. "
            "Take it again at the camera's full resolution."
        )
        fr.append(
            f"La photo est petite ({width}x{height} px) : le spécialiste risque de manquer de détails. "
            "Reprenez-la en pleine résolution."
        )
    if brightness < DARK_THRESHOLD:
        en.append("The photo is too dark: take it again in daylight or with more light, without flash glare.")
        fr.append("La photo est trop sombre : reprenez-la à la lumière du jour ou avec plus d'éclairage.")
    elif brightness > OVEREXPOSED_THRESHOLD:
        en.append("The photo is overexposed (too bright): take it again without flash and out of direct light.")
        fr.append("La photo est surexposée (trop claire) : reprenez-la sans flash et hors lumière directe.")
    elif sharpness < BLUR_THRESHOLD:
        # Only judged when the exposure is right: a dark or washed-out photo has little contrast to measure.
        en.append("The photo looks blurred: hold the phone still, tap the lesion to focus, and take it again.")
        fr.append(
            "La photo semble floue : tenez le téléphone immobile, touchez la lésion à l'écran pour faire la mise "
            "au point, et reprenez-la."
        )
    return en, fr


def _encode(im: Image.Image, fmt: str, *, icc: bytes | None, quality: int) -> bytes:
    """Encode a metadata-free copy of ``im``; only the ICC profile, if any, goes in."""
    clean = Image.frombytes(im.mode, im.size, im.tobytes())  # a new image: no info, no EXIF, no text chunks
    buf = io.BytesIO()
    params: dict[str, object] = {}
    if icc:
        params["icc_profile"] = icc
    if fmt == "JPEG":
        clean.save(buf, "JPEG", quality=quality, optimize=False, progressive=False, **params)
    else:
        clean.save(buf, "PNG", optimize=False, **params)
    return buf.getvalue()


def _fit(size: tuple[int, int], side: int) -> tuple[int, int]:
    """``size`` scaled down (never up) so that its longest side is ``side``."""
    longest = max(size)
    if longest <= side:
        return size
    return max(1, round(size[0] * side / longest)), max(1, round(size[1] * side / longest))


def prepare_photo(
    src: Path,
    dst_dir: Path,
    *,
    max_side: int = 4096,
    thumb_side: int = 320,
    max_pixels: int = MAX_PIXELS,
) -> PreparedPhoto:
    """Write a cleaned copy of the photo ``src`` and its thumbnail into ``dst_dir``, and check its quality.

    The copy is upright (EXIF orientation applied), at most ``max_side`` on its longest side,
    and carries no metadata but its ICC colour profile. JPEG, WebP and AVIF sources become
    JPEG (quality 90); lossless ones become PNG. The thumbnail is ``<stem>.thumb.jpg``.
    The same input always gives the same bytes.

    Raises:
        MediaError: not a still image Pillow decodes safely, too many pixels, damaged, or
            the output would overwrite the source.
    """
    original_size = _check_regular_file(src)
    decoded = _open_bounded(src, max_pixels=max_pixels, max_side=max_side)
    ow, oh = decoded.width, decoded.height
    out_fmt = "JPEG" if decoded.format in _LOSSY_FORMATS else "PNG"
    # Mode first: Pillow resizes palette and 1-bit images with nearest neighbour only.
    out = _flatten(decoded.image) if out_fmt == "JPEG" else _for_png(decoded.image)
    if max(out.size) > max_side:
        out = out.resize(_fit(out.size, max_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    keep_icc = decoded.icc if _family(out.mode) == _family(decoded.image.mode) else None

    sharpness, brightness = _quality(out)
    en, fr = _warnings(ow, oh, sharpness, brightness)

    ext = ".jpg" if out_fmt == "JPEG" else ".png"
    dst = dst_dir / (src.stem + ext)
    thumb_path = dst_dir / (src.stem + ".thumb.jpg")
    if dst.resolve() == src.resolve() or thumb_path.resolve() == src.resolve():
        raise MediaError(
            f"{src.name}: the cleaned copy would overwrite the original; prepare it into another folder.",
            fr=f"{src.name} : la copie nettoyée écraserait l'original ; préparez-la dans un autre dossier.",
        )
    thumb = _flatten(out)
    thumb = thumb.resize(_fit(thumb.size, thumb_side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    dst_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, _encode(out, out_fmt, icc=keep_icc, quality=_JPEG_QUALITY))
    # The thumbnail is a preview: no ICC profile, which can weigh more than the thumbnail itself.
    atomic_write(thumb_path, _encode(thumb, "JPEG", icc=None, quality=_THUMB_QUALITY))
    return PreparedPhoto(
        path=dst,
        thumbnail=thumb_path,
        width=out.width,
        height=out.height,
        media_type="image/jpeg" if out_fmt == "JPEG" else "image/png",
        original_size=original_size,
        original_width=ow,
        original_height=oh,
        sharpness=round(sharpness, 2),
        brightness=round(brightness, 2),
        warnings=tuple(en),
        warnings_fr=tuple(fr),
    )


def check_pdf(path: Path, *, max_bytes: int = MAX_PDF_BYTES) -> int:
    """The number of pages of the PDF at ``path``, once it is known to open without a password.

    Raises:
        MediaError: not a PDF, too large, unreadable, password-protected, or without pages.
    """
    name = path.name
    size = _check_regular_file(path)
    if size > max_bytes:
        raise MediaError(
            f"{name} is {size / (1 << 20):.0f} MiB, over the {max_bytes / (1 << 20):.0f} MiB limit for a PDF: "
            "export it again at a lower resolution, or split it.",
            fr=f"{name} pèse {size / (1 << 20):.0f} Mio, au-delà de la limite de {max_bytes / (1 << 20):.0f} Mio "
            "pour un PDF : exportez-le à nouveau en résolution plus basse, ou découpez-le.",
        )
    if not _head(path, 5).startswith(b"%PDF-"):
        raise MediaError(
            f"{name} is not a PDF: export or print the document to PDF again and attach the new file.",
            fr=f"{name} n'est pas un PDF : exportez ou imprimez à nouveau le document en PDF et joignez-le.",
        )
    unreadable = MediaError(
        f"{name} is not a readable PDF (it is damaged or incomplete): export or print it to PDF again.",
        fr=f"{name} n'est pas un PDF lisible (endommagé ou incomplet) : exportez-le ou imprimez-le à nouveau en PDF.",
    )
    locked = MediaError(
        f"{name} is protected by a password the specialist will not have: remove its password "
        "(open it and print it to a new PDF) and attach it again.",
        fr=f"{name} est protégé par un mot de passe que le spécialiste n'aura pas : retirez son mot de passe "
        "(ouvrez-le et imprimez-le dans un nouveau PDF) et joignez-le à nouveau.",
    )
    try:
        reader = PdfReader(path, strict=False)
        encrypted = reader.is_encrypted
        pages = 0 if encrypted else len(reader.pages)
    except Exception as e:  # pypdf raises anything from PdfReadError to KeyError or RecursionError on bad input
        raise unreadable from e
    if encrypted:
        raise locked
    if pages < 1:
        raise MediaError(
            f"{name} has no pages: export or print the document to PDF again.",
            fr=f"{name} ne contient aucune page : exportez ou imprimez à nouveau le document en PDF.",
        )
    return pages


# (offset, magic, media type): what the first bytes prove, for the formats handled here.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"%PDF-", "application/pdf"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (8, b"WEBP", "image/webp"),  # after b"RIFF" and a length, checked below
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"BM", "image/bmp"),
    (0, b"II*\x00", "image/tiff"),
    (0, b"MM\x00*", "image/tiff"),
    (4, b"ftypavif", "image/avif"),
    (4, b"ftypavis", "image/avif"),
    (128, b"DICM", "application/dicom"),  # after the 128-byte preamble (DICOM PS3.10, 7.1)
)


def _sniff(head: bytes) -> str | None:
    """The media type the first bytes prove, or None."""
    for offset, magic, media_type in _MAGIC:
        if head[offset : offset + len(magic)] == magic and (media_type != "image/webp" or head[:4] == b"RIFF"):
            return media_type
    return "image/heic" if _is_heif(head) else None


def _text_or_binary(path: Path, head: bytes) -> str:
    """The media type of content no magic number identifies: the name's if it has one, else text or bytes."""
    guessed, _ = mimetypes.guess_type(path.name)
    if guessed in _SNIFFED_TYPES:
        # The name promises a photo or a PDF the content does not hold: a wrong export, or a renamed file.
        raise MediaError(
            f"{path.name}: the name says {guessed} but the content is not: export the file again "
            "from the application that made it, without renaming it.",
            fr=f"{path.name} : le nom indique {guessed} mais le contenu n'en est pas : exportez à nouveau le "
            "fichier depuis l'application d'origine, sans le renommer.",
        )
    if guessed:
        return guessed
    if b"\x00" in head:
        return "application/octet-stream"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # a character cut by the end of the sample is still text
            return "application/octet-stream"
    return "text/plain"


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy through a temporary file and rename: a crash never leaves half a file under the real name."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name("." + dst.name + ".part")
    try:
        with src.open("rb") as fi, tmp.open("wb") as fo:
            shutil.copyfileobj(fi, fo, _CHUNK)
            fo.flush()
            os.fsync(fo.fileno())
        tmp.chmod(0o600)
        tmp.replace(dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def prepare_attachment(src: Path, dst_dir: Path) -> Prepared:
    """Ready ``src`` to be sent, into ``dst_dir``: photos cleaned, PDFs checked, the rest copied unchanged.

    The kind is decided by the content's first bytes, never by the name.

    Raises:
        MediaError: a folder, an empty or unreadable file, a photo or PDF that fails its
            checks, or a name that promises a photo or PDF the content is not.
    """
    _check_regular_file(src)
    try:
        head = _head(src)
    except OSError as e:
        raise MediaError(
            f"{src.name} cannot be read ({e.strerror}): check the file is still there.",
            fr=f"{src.name} est illisible ({e.strerror}) : vérifiez que le fichier existe toujours.",
        ) from e
    kind = _sniff(head)
    if kind is not None and kind.startswith("image/"):
        photo = prepare_photo(src, dst_dir)
        return Prepared(
            name=photo.path.name,
            path=photo.path,
            media_type=photo.media_type,
            size=photo.path.stat().st_size,
            thumbnail=photo.thumbnail,
            warnings=photo.warnings,
            warnings_fr=photo.warnings_fr,
        )
    pages = check_pdf(src) if kind == "application/pdf" else None
    media_type = kind or _text_or_binary(src, head)
    dst = dst_dir / src.name
    if dst.resolve() != src.resolve():
        _copy_atomic(src, dst)
    return Prepared(name=dst.name, path=dst, media_type=media_type, size=dst.stat().st_size, pages=pages)
