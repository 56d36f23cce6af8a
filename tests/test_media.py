"""Attachments: photos cleaned of metadata, upright, bounded and quality-checked; PDFs checked.

Every input is built here with Pillow, fpdf2 or pypdf, or by hand for the hostile ones
(a PNG header claiming ten billion pixels, a truncated JPEG, a text file named .jpg).
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from fpdf import FPDF
from PIL import ExifTags, Image, ImageCms, ImageDraw, ImageFilter
from PIL.PngImagePlugin import PngInfo
from pypdf import PdfReader, PdfWriter

from client.media import (
    BLUR_THRESHOLD,
    MediaError,
    Prepared,
    PreparedPhoto,
    check_pdf,
    prepare_attachment,
    prepare_photo,
)

RED = (230, 20, 20)


def scene(w: int, h: int, seed: int = 1) -> Image.Image:
    """A skin-like photo: blotches of skin tones and dark hairs, sharp."""
    rnd = random.Random(seed)
    im = Image.new("RGB", (w, h), (205, 165, 145))
    d = ImageDraw.Draw(im)
    for _ in range(25):
        x, y, r = rnd.randrange(w), rnd.randrange(h), rnd.randrange(w // 40, w // 6)
        d.ellipse(
            (x, y, x + r, y + r), fill=tuple(max(0, min(255, v + rnd.randrange(-50, 50))) for v in (190, 140, 120))
        )
    for _ in range(80):
        x, y = rnd.randrange(w), rnd.randrange(h)
        d.line((x, y, x + rnd.randrange(-w // 10, w // 10), y + rnd.randrange(-h // 10, h // 10)), fill=(60, 40, 30))
    return im


def save(im: Image.Image, path: Path, fmt: str, **params: object) -> Path:
    im.save(path, fmt, **params)
    return path


def is_red(px: object) -> bool:
    assert isinstance(px, tuple)
    r, g, b = px
    return bool(r > 180 and g < 80 and b < 80)


def gps_exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.Base.Make] = "PhoneCo"
    exif[ExifTags.Base.BodySerialNumber] = "SN-123456"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (48.0, 51.0, 24.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (2.0, 21.0, 7.0)
    return exif


def assert_no_metadata(path: Path) -> None:
    with Image.open(path) as img:
        assert not img.getexif()
        assert not img.getexif().get_ifd(ExifTags.IFD.GPSInfo)
        leaked = {"exif", "xmp", "XML:com.adobe.xmp", "comment", "photoshop", "Comment", "Author", "Description"}
        assert not leaked & set(img.info), img.info.keys()
        assert not getattr(img, "text", {})
        raw = path.read_bytes()
        for secret in (b"PhoneCo", b"SN-123456", b"Dupont", b"xmpmeta", b"Exif\x00\x00"):
            assert secret not in raw


def expect_error(fn: Callable[..., object], *args: object, match: str, **kwargs: object) -> MediaError:
    with pytest.raises(MediaError, match=match) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.code == "bad_attachment"
    assert err.message_fr
    assert err.message_fr != err.message
    return err


# --- photos: metadata, orientation, size ---------------------------------------------------------------


def test_jpeg_gps_exif_comment_xmp_stripped_icc_kept(tmp_path: Path) -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = save(
        scene(1600, 1200),
        tmp_path / "lesion.jpg",
        "JPEG",
        exif=gps_exif(1),
        comment=b"Mme Dupont",
        xmp=b"<x:xmpmeta>Dupont</x:xmpmeta>",
        icc_profile=icc,
    )
    out = tmp_path / "out"
    photo = prepare_photo(src, out)
    assert isinstance(photo, PreparedPhoto)
    assert photo.path == out / "lesion.jpg"
    assert photo.media_type == "image/jpeg"
    assert (photo.width, photo.height) == (1600, 1200)
    assert photo.original_size == src.stat().st_size
    assert_no_metadata(photo.path)
    assert_no_metadata(photo.thumbnail)
    with Image.open(photo.path) as img:
        assert img.format == "JPEG"
        assert img.info.get("icc_profile") == icc
    assert photo.warnings == photo.warnings_fr == ()


def test_orientation_6_applied_and_marker_moves_to_top_right(tmp_path: Path) -> None:
    im = scene(1600, 1200)
    ImageDraw.Draw(im).rectangle((0, 0, 119, 119), fill=RED)  # stored top-left
    src = save(im, tmp_path / "wound.jpg", "JPEG", exif=gps_exif(6), quality=95)
    photo = prepare_photo(src, tmp_path / "out")
    assert (photo.width, photo.height) == (1200, 1600)  # turned a quarter clockwise
    assert (photo.original_width, photo.original_height) == (1200, 1600)
    with Image.open(photo.path) as img:
        assert img.size == (1200, 1600)
        assert not img.getexif()  # the Orientation tag went with the rest: no viewer turns it twice
        rgb = img.convert("RGB")
        assert is_red(rgb.getpixel((1200 - 60, 60)))
        assert not is_red(rgb.getpixel((60, 60)))
        assert not is_red(rgb.getpixel((60, 1600 - 60)))


def test_png_text_chunks_dropped_png_stays_png(tmp_path: Path) -> None:
    info = PngInfo()
    info.add_text("Comment", "Patient: Mme Dupont, née le 12/03/1950")
    info.add_text("Author", "Dupont", zip=True)
    info.add_itxt("Description", "Dupont", lang="fr")
    src = save(scene(1200, 900).convert("RGBA"), tmp_path / "ecg.png", "PNG", pnginfo=info)
    photo = prepare_photo(src, tmp_path / "out")
    assert photo.path.name == "ecg.png"
    assert photo.media_type == "image/png"
    with Image.open(photo.path) as img:
        assert img.format == "PNG"
        assert img.mode == "RGBA"
    assert_no_metadata(photo.path)


def test_webp_becomes_jpeg(tmp_path: Path) -> None:
    src = save(scene(1200, 900), tmp_path / "derm.webp", "WEBP", quality=90, exif=gps_exif(1))
    photo = prepare_photo(src, tmp_path / "out")
    assert photo.path.name == "derm.jpg"
    assert photo.media_type == "image/jpeg"
    assert_no_metadata(photo.path)


def test_longest_side_bounded_and_thumbnail_small(tmp_path: Path) -> None:
    src = save(scene(3000, 1000), tmp_path / "wide.jpg", "JPEG")
    photo = prepare_photo(src, tmp_path / "out", max_side=1024, thumb_side=200)
    assert (photo.width, photo.height) == (1024, 341)
    assert (photo.original_width, photo.original_height) == (3000, 1000)
    assert photo.thumbnail == tmp_path / "out" / "wide.thumb.jpg"
    with Image.open(photo.thumbnail) as thumb:
        assert thumb.format == "JPEG"
        assert max(thumb.size) == 200
    assert photo.thumbnail.stat().st_size < 30_000


def test_large_jpeg_decoded_at_reduced_scale_still_bounded(tmp_path: Path) -> None:
    src = save(scene(5000, 2500), tmp_path / "big.jpg", "JPEG", quality=70)
    photo = prepare_photo(src, tmp_path / "out", max_side=1000)
    assert (photo.width, photo.height) == (1000, 500)
    assert (photo.original_width, photo.original_height) == (5000, 2500)


def test_deterministic(tmp_path: Path) -> None:
    src = save(scene(1300, 1000), tmp_path / "p.jpg", "JPEG", exif=gps_exif(6))
    a = prepare_photo(src, tmp_path / "a")
    b = prepare_photo(src, tmp_path / "b")
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.thumbnail.read_bytes() == b.thumbnail.read_bytes()
    assert (a.sharpness, a.brightness) == (b.sharpness, b.brightness)


# --- photo quality warnings ---------------------------------------------------------------------------


def test_good_photo_no_warning(tmp_path: Path) -> None:
    photo = prepare_photo(save(scene(1600, 1200), tmp_path / "good.jpg", "JPEG"), tmp_path / "out")
    assert photo.warnings == ()
    assert photo.sharpness > 5 * BLUR_THRESHOLD


def test_tiny_photo_warned(tmp_path: Path) -> None:
    photo = prepare_photo(save(scene(400, 300), tmp_path / "tiny.jpg", "JPEG"), tmp_path / "out")
    assert len(photo.warnings) == 1
    assert "small (400x300 px)" in photo.warnings[0]
    assert "petite" in photo.warnings_fr[0]


def test_blurred_photo_warned(tmp_path: Path) -> None:
    blurred = scene(1600, 1200).filter(ImageFilter.GaussianBlur(4))
    photo = prepare_photo(save(blurred, tmp_path / "blur.jpg", "JPEG"), tmp_path / "out")
    assert photo.sharpness < BLUR_THRESHOLD
    assert len(photo.warnings) == 1
    assert "blurred" in photo.warnings[0]
    assert "floue" in photo.warnings_fr[0]


def test_dark_photo_warned_not_called_blurred(tmp_path: Path) -> None:
    dark = scene(1600, 1200).point(lambda v: v * 0.15)
    photo = prepare_photo(save(dark, tmp_path / "dark.jpg", "JPEG"), tmp_path / "out")
    assert photo.warnings == (
        "The photo is too dark: take it again in daylight or with more light, without flash glare.",
    )
    assert "sombre" in photo.warnings_fr[0]


def test_overexposed_photo_warned(tmp_path: Path) -> None:
    bright = scene(1600, 1200).point(lambda v: min(255, v + 120))
    photo = prepare_photo(save(bright, tmp_path / "flash.jpg", "JPEG"), tmp_path / "out")
    assert [w for w in photo.warnings if "overexposed" in w]
    assert "surexposée" in photo.warnings_fr[0]


# --- hostile or broken images -------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(("w", "h"), [(100_000, 100_000), (9_000, 9_000)])  # Pillow's bound, then ours (81 MP)
def test_decompression_bomb_refused_before_decoding(tmp_path: Path, w: int, h: int) -> None:
    src = tmp_path / "bomb.png"
    src.write_bytes(png_claiming(w, h))
    expect_error(prepare_photo, src, tmp_path / "out", match="megapixels")
    expect_error(prepare_attachment, src, tmp_path / "out", match="megapixels")
    assert not (tmp_path / "out").exists()


def test_truncated_jpeg_refused(tmp_path: Path) -> None:
    whole = io.BytesIO()
    scene(1200, 900).save(whole, "JPEG")
    src = tmp_path / "cut.jpg"
    src.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    err = expect_error(prepare_photo, src, tmp_path / "out", match="damaged or incomplete")
    assert "copy it again" in str(err)


def test_text_named_jpg_refused(tmp_path: Path) -> None:
    src = tmp_path / "photo.jpg"
    src.write_text("Compte rendu de consultation, pas une photo.\n")
    expect_error(prepare_photo, src, tmp_path / "out", match="not an image that can be read")
    expect_error(prepare_attachment, src, tmp_path / "out", match="the name says image/jpeg")


def test_heic_refused_with_conversion_advice(tmp_path: Path) -> None:
    src = tmp_path / "IMG_0001.HEIC"
    src.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 200)
    err = expect_error(prepare_attachment, src, tmp_path / "out", match="convert it to JPEG")
    assert "JPEG" in err.message_fr


def test_animation_refused(tmp_path: Path) -> None:
    frames = [scene(200, 150, seed=i) for i in range(3)]
    src = tmp_path / "anim.gif"
    frames[0].save(src, "GIF", save_all=True, append_images=frames[1:])
    expect_error(prepare_photo, src, tmp_path / "out", match="several images")


def test_output_never_overwrites_source(tmp_path: Path) -> None:
    src = save(scene(1200, 900), tmp_path / "same.jpg", "JPEG")
    before = src.read_bytes()
    expect_error(prepare_photo, src, tmp_path, match="overwrite the original")
    assert src.read_bytes() == before


def test_empty_file_and_folder_refused(tmp_path: Path) -> None:
    empty = tmp_path / "vide.jpg"
    empty.write_bytes(b"")
    for fn in (prepare_photo, prepare_attachment):
        expect_error(fn, empty, tmp_path / "out", match="is empty")
    expect_error(check_pdf, empty, match="is empty")
    folder = tmp_path / "photos"
    folder.mkdir()
    expect_error(prepare_attachment, folder, tmp_path / "out", match="is a folder")
    expect_error(prepare_attachment, tmp_path / "absent.png", tmp_path / "out", match="cannot be read")


# --- PDFs ---------------------------------------------------------------------------------------------


def make_pdf(path: Path, pages: int = 2) -> Path:
    pdf = FPDF()
    pdf.set_font("Helvetica", size=12)
    for i in range(pages):
        pdf.add_page()
        pdf.cell(text=f"Bilan biologique page {i + 1}")
    path.write_bytes(bytes(pdf.output()))
    return path


def test_real_pdf_counted_and_copied_as_is(tmp_path: Path) -> None:
    src = make_pdf(tmp_path / "bilan.pdf", pages=3)
    assert check_pdf(src) == 3
    prepared = prepare_attachment(src, tmp_path / "out")
    assert prepared == Prepared(
        name="bilan.pdf",
        path=tmp_path / "out" / "bilan.pdf",
        media_type="application/pdf",
        size=src.stat().st_size,
        pages=3,
    )
    assert prepared.path.read_bytes() == src.read_bytes()


def test_pdf_found_by_content_not_name(tmp_path: Path) -> None:
    src = make_pdf(tmp_path / "scan_sans_extension", pages=1)
    prepared = prepare_attachment(src, tmp_path / "out")
    assert prepared.media_type == "application/pdf"
    assert prepared.pages == 1


def test_fake_pdf_refused(tmp_path: Path) -> None:
    src = tmp_path / "faux.pdf"
    src.write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 8 + b"\n%%EOF\n")
    err = expect_error(check_pdf, src, match="PDF")
    assert "readable PDF" in str(err) or "no pages" in str(err)
    expect_error(prepare_attachment, src, tmp_path / "out", match="PDF")
    assert not (tmp_path / "out" / "faux.pdf").exists()


def test_not_a_pdf_refused(tmp_path: Path) -> None:
    src = tmp_path / "lettre.pdf"
    src.write_text("Cher confrère,")
    expect_error(check_pdf, src, match="is not a PDF")
    expect_error(prepare_attachment, src, tmp_path / "out", match="the name says application/pdf")


def test_encrypted_pdf_refused(tmp_path: Path) -> None:
    plain = make_pdf(tmp_path / "plain.pdf")
    writer = PdfWriter(clone_from=PdfReader(plain))
    writer.encrypt(user_password="secret", owner_password="owner")
    locked = tmp_path / "locked.pdf"
    with locked.open("wb") as f:
        writer.write(f)
    err = expect_error(check_pdf, locked, match="remove its password")
    assert "mot de passe" in err.message_fr


def test_pdf_over_size_limit_refused(tmp_path: Path) -> None:
    src = make_pdf(tmp_path / "gros.pdf")
    expect_error(check_pdf, src, match="over the 0 MiB limit", max_bytes=100)


# --- everything else passes unchanged -----------------------------------------------------------------


def test_dicom_and_text_pass_through(tmp_path: Path) -> None:
    dcm = tmp_path / "IRM.dcm"
    dcm.write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)))
    p = prepare_attachment(dcm, tmp_path / "out")
    assert (p.media_type, p.thumbnail, p.warnings) == ("application/dicom", None, ())
    assert p.path.read_bytes() == dcm.read_bytes()

    txt = tmp_path / "notes"
    txt.write_text("Tension 14/9, fébricule à 38 °C.\n", encoding="utf-8")
    assert prepare_attachment(txt, tmp_path / "out").media_type == "text/plain"

    blob = tmp_path / "trace.bin"
    blob.write_bytes(b"\x00\x01\x02\xff" * 64)
    assert prepare_attachment(blob, tmp_path / "out").media_type == "application/octet-stream"


def test_attachment_dispatches_photos(tmp_path: Path) -> None:
    src = save(scene(1600, 1200), tmp_path / "sans_nom", "JPEG", exif=gps_exif(1))
    p = prepare_attachment(src, tmp_path / "out")
    assert p.name == "sans_nom.jpg"
    assert p.media_type == "image/jpeg"
    assert p.thumbnail is not None
    assert p.thumbnail.exists()
    assert p.size == p.path.stat().st_size
    assert_no_metadata(p.path)
