//! Image preprocessing against transformers 5.17's PIL backend (goldens in
//! tests/fixtures/goldens/pixels_*.safetensors), and decoding errors.

mod common;

use glimpse::config::PreprocessorConfig;
use glimpse::image::{decode_rgb, ImageProcessor};
use glimpse::Error;

/// Every PNG fixture (JPEG is excluded: decoders differ by a few LSB).
const PNGS: [&str; 9] = [
    "wide_301x97",
    "tall_83x311",
    "odd_257x181",
    "exact_224x224",
    "tiny_13x9",
    "rgba_150x120",
    "grey_67x45",
    "greyalpha_40x50",
    "palette_100x80",
];

/// Golden pixel values of one image: transformers stores them losslessly as the uint8 image after
/// RGB conversion and resize/crop, plus the float32 table `_lut[c, v]` its rescale+normalize maps
/// each byte to (scripts/make_fixtures.py asserts `pixel_values == _lut[c, u8]` bit for bit).
fn golden_pixels(goldens: &glimpse::weights::Checkpoint, stem: &str) -> (Vec<f32>, Vec<usize>) {
    let (lut, _) = goldens.f32("_lut").expect("lut");
    let (info, bytes) = goldens.raw_bytes(stem).expect("golden image");
    let plane = info.shape[1] * info.shape[2];
    let values = bytes.iter().enumerate().map(|(i, &v)| lut[(i / plane) * 256 + v as usize]).collect();
    (values, info.shape.clone())
}

fn check_against(processor: &ImageProcessor, golden_file: &str) {
    let goldens = common::goldens(golden_file);
    for stem in PNGS {
        let px = processor.preprocess_file(&common::image(&format!("{stem}.png"))).expect("preprocess");
        let (want, shape) = golden_pixels(&goldens, stem);
        assert_eq!(shape, vec![3, px.height, px.width], "{stem}: shape");
        // Same integer resampling, same float64 rescale and float32 normalize as numpy: the
        // values must agree to float32 rounding (1e-6 absolute on values of magnitude ~2).
        let (max, _) = common::errors(&px.data, &want);
        assert!(max <= 1e-6, "{stem}: max abs error {max:e} vs transformers");
    }
}

#[test]
fn blip_pixels_match_transformers() {
    let (cfg, _) = PreprocessorConfig::load_from_dir(&common::model_dir("blip2-opt-tiny")).unwrap();
    check_against(&ImageProcessor::new(cfg), "pixels_blip.safetensors");
}

#[test]
fn clip_pixels_match_transformers() {
    let (cfg, _) = PreprocessorConfig::load_from_dir(&common::fixtures().join("clip-preprocessor")).unwrap();
    assert!(cfg.do_center_crop && cfg.size.shortest_edge == Some(224));
    check_against(&ImageProcessor::new(cfg), "pixels_clip.safetensors");
}

#[test]
fn jpeg_decodes() {
    let img = glimpse::image::load_rgb(&common::image("photo_q90.jpg")).unwrap();
    assert!(img.width() > 0 && img.height() > 0);
}

fn image_error(bytes: &[u8]) -> String {
    match decode_rgb(bytes, "input.png") {
        Err(Error::Image { msg, .. }) => msg,
        Err(other) => panic!("wrong error kind: {other}"),
        Ok(_) => panic!("decoded garbage"),
    }
}

#[test]
fn empty_file_is_an_error() {
    assert!(image_error(&[]).contains("empty"));
}

#[test]
fn truncated_png_is_an_error() {
    let bytes = std::fs::read(common::image("odd_257x181.png")).unwrap();
    let msg = image_error(&bytes[..bytes.len() / 2]);
    assert!(msg.contains("cannot decode"), "{msg}");
}

#[test]
fn corrupt_bytes_are_an_error() {
    let msg = image_error(b"this is not an image at all, just text");
    assert!(msg.contains("not a recognised image format"), "{msg}");
    let mut bytes = std::fs::read(common::image("wide_301x97.png")).unwrap();
    for b in bytes.iter_mut().skip(60).take(200) {
        *b ^= 0x5a;
    }
    assert!(decode_rgb(&bytes, "x.png").is_err());
}

/// A PNG whose IHDR claims `w x h` pixels (valid CRCs) but holds no image data.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    // An empty IDAT chunk: the header is complete, the pixel data is not there.
    png.extend_from_slice(&0u32.to_be_bytes());
    png.extend_from_slice(b"IDAT");
    png.extend_from_slice(&crc32(b"IDAT").to_be_bytes());
    png
}

#[test]
fn decompression_bomb_is_refused_before_decoding() {
    let msg = image_error(&png_header(100_000, 100_000));
    assert!(msg.contains("pixel limit"), "{msg}");
}

#[test]
fn zero_sized_image_is_an_error() {
    // The PNG decoder itself rejects a 0-pixel IHDR; either way it is a clear image error.
    let msg = image_error(&png_header(0, 10));
    assert!(!msg.is_empty());
}

/// Every supported container decodes to the same pixels as the PNG it was made from (GIF is
/// palette-quantised, so only its size is checked; JPEG is covered by `jpeg_decodes`).
#[test]
fn bmp_webp_gif_decode() {
    let png = glimpse::image::load_rgb(&common::image("odd_257x181.png")).unwrap();
    let dynamic = image::DynamicImage::ImageRgb8(png.clone());
    for format in [image::ImageFormat::Bmp, image::ImageFormat::WebP, image::ImageFormat::Gif] {
        let mut bytes = std::io::Cursor::new(Vec::new());
        dynamic.write_to(&mut bytes, format).unwrap();
        let decoded = decode_rgb(bytes.get_ref(), &format!("x.{format:?}")).unwrap();
        assert_eq!(decoded.dimensions(), png.dimensions(), "{format:?}");
        if format != image::ImageFormat::Gif {
            assert_eq!(decoded, png, "{format:?} is lossless");
        }
    }
}
