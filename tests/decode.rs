//! Decoding against Pillow 13 (goldens in tests/fixtures/goldens/decode_rgb.safetensors, from
//! scripts/make_fixtures.py): JPEG through libjpeg-turbo, 16-bit PNG, EXIF orientation, truncated
//! files, and the size limits on files and pixels.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use glimpse::config::PreprocessorConfig;
use glimpse::image::{decode_rgb, decode_rgb_with, load_rgb, load_rgb_with, DecodeLimits, ImageProcessor, MAX_PIXELS};
use glimpse::Error;

fn decode_fixture(name: &str) -> PathBuf {
    common::image(&format!("decode/{name}"))
}

/// Golden stems: one per fixture file (keys with a `.` are derived arrays such as `.blip224`).
fn golden_stems(goldens: &glimpse::weights::Checkpoint) -> Vec<String> {
    let mut stems: Vec<String> = goldens.names().filter(|n| !n.contains('.')).map(String::from).collect();
    stems.sort();
    stems
}

fn fixture_for(stem: &str) -> PathBuf {
    ["jpg", "png"]
        .iter()
        .map(|ext| decode_fixture(&format!("{stem}.{ext}")))
        .find(|p| p.exists())
        .expect("fixture file")
}

/// Every decode fixture (JPEG baseline/progressive x 4:2:0/4:2:2/4:4:4/grey/CMYK, 16-bit PNG,
/// 8 EXIF orientations in JPEG and PNG, XMP orientation) decodes to exactly Pillow's
/// `exif_transpose(open(f)).convert("RGB")`: same size, every byte equal.
#[test]
fn decoded_pixels_equal_pillow() {
    let goldens = common::goldens("decode_rgb.safetensors");
    let stems = golden_stems(&goldens);
    assert!(stems.len() >= 31, "expected the full decode fixture set, found {stems:?}");
    let mut failures = Vec::new();
    for stem in &stems {
        let (info, want) = goldens.raw_bytes(stem).unwrap();
        let img = match load_rgb(&fixture_for(stem)) {
            Ok(img) => img,
            Err(e) => {
                failures.push(format!("{stem}: {e}"));
                continue;
            }
        };
        let got_shape = vec![img.height() as usize, img.width() as usize, 3];
        if got_shape != info.shape {
            failures.push(format!("{stem}: shape {got_shape:?}, Pillow {:?}", info.shape));
            continue;
        }
        let diff: Vec<i32> = img.as_raw().iter().zip(want).map(|(&a, &b)| i32::from(a) - i32::from(b)).collect();
        let n = diff.iter().filter(|&&d| d != 0).count();
        if n > 0 {
            let max = diff.iter().map(|d| d.abs()).max().unwrap();
            failures.push(format!("{stem}: {n} of {} bytes differ (max {max})", diff.len()));
        }
    }
    assert!(failures.is_empty(), "decoded pixels differ from Pillow 13:\n{}", failures.join("\n"));
}

/// Decoded JPEG (4:2:0 progressive) and 16-bit PNG all the way to BLIP pixel_values: the
/// preprocessed values equal `_lut[Pillow's 224x224 bicubic resize of the decoded image]`.
#[test]
fn preprocessed_decode_fixtures_match_pillow() {
    let (cfg, _) = PreprocessorConfig::load_from_dir(&common::model_dir("blip2-opt-tiny")).unwrap();
    let processor = ImageProcessor::new(cfg);
    let goldens = common::goldens("decode_rgb.safetensors");
    let (lut, _) = common::goldens("pixels_blip.safetensors").f32("_lut").unwrap();
    for stem in ["jpeg_progressive_420", "png16_rgb"] {
        let px = processor.preprocess_file(&fixture_for(stem)).unwrap();
        let (info, bytes) = goldens.raw_bytes(&format!("{stem}.blip224")).unwrap();
        assert_eq!(info.shape, vec![3, px.height, px.width], "{stem}");
        let plane = px.height * px.width;
        let want: Vec<f32> = bytes.iter().enumerate().map(|(i, &v)| lut[(i / plane) * 256 + v as usize]).collect();
        let (max, _) = common::errors(&px.data, &want);
        assert!(max <= 1e-6, "{stem}: max abs error {max:e} vs Pillow resize + transformers normalize");
    }
}

fn image_error(result: glimpse::Result<image::RgbImage>) -> (String, String) {
    match result {
        Err(Error::Image { path, msg }) => (path, msg),
        Err(other) => panic!("wrong error kind: {other}"),
        Ok(img) => panic!("decoded a {}x{} image where an error was due", img.width(), img.height()),
    }
}

/// Pillow raises "image file is truncated" on a JPEG that ends early, even when only the EOI
/// marker is missing, for baseline and progressive files alike; so does glimpse, naming the file.
#[test]
fn truncated_jpegs_are_refused() {
    let dir = common::tempdir();
    for name in
        ["jpeg_baseline_420.jpg", "jpeg_progressive_420.jpg", "jpeg_baseline_cmyk.jpg", "jpeg_progressive_grey.jpg"]
    {
        let bytes = std::fs::read(decode_fixture(name)).unwrap();
        for cut in [bytes.len() - 2, bytes.len() - 1, bytes.len() * 2 / 3, 300] {
            let path = dir.path().join(format!("cut_{cut}_{name}"));
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let (at, msg) = image_error(load_rgb(&path));
            assert_eq!(at, path.display().to_string());
            assert!(msg.contains("truncated") || msg.contains("cannot decode"), "{name} cut at {cut}: {msg}");
            if cut >= bytes.len() * 2 / 3 {
                assert!(msg.contains("truncated"), "{name} cut at {cut}: {msg}");
            }
        }
        // Bytes after the end-of-image marker are ignored, as in Pillow.
        let mut padded = bytes.clone();
        padded.extend_from_slice(b"trailing garbage");
        assert_eq!(decode_rgb(&padded, name).unwrap(), decode_rgb(&bytes, name).unwrap(), "{name}");
    }
}

/// PNG truncation as in Pillow 13: image data cut short is refused; a file that ends after the
/// compressed data (missing its zlib checksum, chunk CRC or IEND) still decodes, to the same
/// pixels, because Pillow stops reading once every row is decoded.
#[test]
fn truncated_pngs_follow_pillow() {
    let bytes = std::fs::read(decode_fixture("png16_rgb.png")).unwrap();
    let full = decode_rgb(&bytes, "full.png").unwrap();
    let (_, msg) = image_error(decode_rgb(&bytes[..bytes.len() / 2], "half.png"));
    assert!(msg.contains("cannot decode"), "{msg}");
    // IEND chunk is the last 12 bytes; before it the IDAT CRC (4) and the zlib adler32 (4).
    for (what, cut) in [("IEND", 12), ("IDAT CRC", 16), ("zlib checksum", 20)] {
        let got =
            decode_rgb(&bytes[..bytes.len() - cut], "cut.png").unwrap_or_else(|e| panic!("without its {what}: {e}"));
        assert_eq!(got, full, "without its {what}");
    }
}

#[test]
fn file_size_is_checked_before_reading() {
    let dir = common::tempdir();
    let path = dir.path().join("big.png");
    let src = std::fs::read(common::image("odd_257x181.png")).unwrap();
    std::fs::write(&path, &src).unwrap();
    let limits = DecodeLimits { max_file_bytes: src.len() as u64 - 1, ..DecodeLimits::default() };
    let (at, msg) = image_error(load_rgb_with(&path, &limits));
    assert_eq!(at, path.display().to_string());
    assert!(msg.contains(&format!("{} bytes", src.len())) && msg.contains("GLIMPSE_MAX_IMAGE_BYTES"), "{msg}");
    let (_, msg) = image_error(decode_rgb_with(&src, "mem.png", &limits));
    assert!(msg.contains("limit"), "{msg}");
    // Exactly at the limit is fine.
    let limits = DecodeLimits { max_file_bytes: src.len() as u64, ..DecodeLimits::default() };
    assert!(load_rgb_with(&path, &limits).is_ok());
}

/// `glimpse caption /dev/zero` used to read until memory ran out: devices, FIFOs and
/// directories are refused without reading.
#[test]
fn non_regular_files_are_refused() {
    let dir = common::tempdir();
    for path in [Path::new("/dev/zero"), dir.path()] {
        if !path.exists() {
            continue;
        }
        let (_, msg) = image_error(load_rgb(path));
        assert!(msg.contains("not a regular file"), "{}: {msg}", path.display());
    }
    #[cfg(unix)]
    {
        let fifo = dir.path().join("fifo");
        if Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success()) {
            // Opening a FIFO for reading blocks until a writer comes: it must not be opened.
            let (_, msg) = image_error(load_rgb(&fifo));
            assert!(msg.contains("not a regular file"), "{msg}");
        }
    }
}

/// A PNG claiming `w x h` pixels, with (almost) no image data behind it.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    // An empty zlib stream (stored, final, length 0) as the only image data.
    let zlib_empty = [0x78, 0x01, 0x01, 0x00, 0x00, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x01];
    for (kind, data) in [(&b"IHDR"[..], &ihdr[..]), (b"IDAT", &zlib_empty), (b"IEND", &[])] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let body = [kind, data].concat();
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// Pillow's decompression-bomb rule: more than 2 x MAX_IMAGE_PIXELS (178,956,970) is refused
/// from the header alone; between 1x and 2x Pillow only warns, so glimpse goes on decoding.
#[test]
fn pixel_limit_follows_pillow() {
    assert_eq!(MAX_PIXELS, 178_956_970);
    let (_, msg) = image_error(decode_rgb(&png_header(20_000, 9_000), "bomb.png"));
    assert!(msg.contains("decompression bomb") && msg.contains("180000000"), "{msg}");
    // 100 megapixels: past the pixel check (then refused only because there is no image data).
    let (_, msg) = image_error(decode_rgb(&png_header(10_000, 10_000), "big.png"));
    assert!(!msg.contains("decompression bomb"), "{msg}");
    // The same check on a JPEG header, before libjpeg allocates anything: SOF dimensions patched.
    let mut jpeg = std::fs::read(decode_fixture("jpeg_progressive_420.jpg")).unwrap();
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC2]).expect("SOF2");
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0x23, 0x28, 0x4E, 0x20]); // height 9000, width 20000
    let (_, msg) = image_error(decode_rgb(&jpeg, "bomb.jpg"));
    assert!(msg.contains("decompression bomb") && msg.contains("20000x9000"), "{msg}");
    // A lower limit of one's own applies the same way.
    let limits = DecodeLimits { max_pixels: 45 * 31 - 1, ..DecodeLimits::default() };
    let (_, msg) = image_error(load_rgb_with(&decode_fixture("jpeg_baseline_444.jpg"), &limits));
    assert!(msg.contains("1394-pixel limit"), "{msg}");
}

/// A progressive JPEG that repeats its scans forever stops at the scan limit, with an error.
#[test]
fn endless_progressive_scans_are_refused() {
    let jpeg = std::fs::read(decode_fixture("jpeg_progressive_grey.jpg")).unwrap();
    // Everything before the first scan, then that DC scan (SOS up to the next marker) repeated.
    let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    let next = sos
        + 2
        + jpeg[sos + 2..].windows(2).position(|w| w[0] == 0xFF && w[1] != 0 && !(0xD0..=0xD7).contains(&w[1])).unwrap();
    let mut bytes = jpeg[..sos].to_vec();
    for _ in 0..=glimpse::image::MAX_JPEG_SCANS {
        bytes.extend_from_slice(&jpeg[sos..next]);
    }
    bytes.extend_from_slice(&[0xFF, 0xD9]);
    let (_, msg) = image_error(decode_rgb(&bytes, "scans.jpg"));
    assert!(msg.contains("scans"), "{msg}");
}

/// The limit on file size is read from GLIMPSE_MAX_IMAGE_BYTES (in a child process: the CLI), and
/// a malformed value is an error that names the variable.
#[test]
fn file_limit_env_var_is_honoured() {
    let run = |value: &str| {
        Command::new(env!("CARGO_BIN_EXE_glimpse"))
            .args(["caption", "--model"])
            .arg(common::model_dir("blip2-opt-tiny"))
            .arg(common::image("odd_257x181.png"))
            .env("GLIMPSE_MAX_IMAGE_BYTES", value)
            .output()
            .unwrap()
    };
    let o = run("1000");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("1000-byte limit") && err.contains("odd_257x181.png"), "{err}");
    let o = run("lots");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("GLIMPSE_MAX_IMAGE_BYTES"), "{err}");
}

/// `png` with a chunk `kind` holding `data` inserted after IHDR.
fn with_chunk(png: &[u8], kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    let crc = crc32(&chunk[4..]);
    chunk.extend_from_slice(&crc.to_be_bytes());
    [&png[..33], &chunk[..], &png[33..]].concat()
}

/// A PNG whose iCCP or zTXt chunk inflates past 1 MiB is refused as Pillow refuses it
/// ("Decompressed Data Too Large") before anything inflates it (a 4 MB chunk could take 4 GB);
/// one under the bound decodes to the same pixels.
#[test]
fn png_compressed_metadata_is_bounded_as_pillow() {
    let png = std::fs::read(common::image("odd_257x181.png")).unwrap();
    assert_eq!(&png[12..16], b"IHDR");
    let plain = decode_rgb(&png, "odd.png").unwrap();
    let zlib = |n: usize| miniz_oxide::deflate::compress_to_vec_zlib(&vec![0u8; n], 6);
    for (kind, prefix) in [(b"iCCP", &b"icc\0\0"[..]), (b"zTXt", &b"Comment\0\0"[..])] {
        let big = with_chunk(&png, kind, &[prefix, &zlib(64 << 20)].concat());
        let e = decode_rgb(&big, "big.png").unwrap_err().to_string();
        assert!(e.contains("Decompressed Data Too Large") && e.contains("big.png"), "{e}");
        let small = with_chunk(&png, kind, &[prefix, &zlib(512 << 10)].concat());
        assert_eq!(decode_rgb(&small, "small.png").unwrap(), plain);
    }
}
