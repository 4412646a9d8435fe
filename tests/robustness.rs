//! Malformed input never panics: the safetensors loader and the image decoder get truncated and
//! bit-flipped copies of real fixture files (fresh random positions each run, seed printed) and
//! must return `Ok` or a clear `Err`, never unwind.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

struct Rng(u64);
impl Rng {
    fn new(test: &str) -> Self {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        println!("{test}: seed {seed}");
        Rng(seed | 1)
    }
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Truncations at random lengths and random bit flips of `bytes`, each handed to `check`.
fn mutations(bytes: &[u8], rng: &mut Rng, focus: usize, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(bytes[..rng.below(bytes.len())].to_vec());
        let mut flipped = bytes.to_vec();
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(focus.min(bytes.len()));
            flipped[at] ^= 1 << rng.below(8);
        }
        out.push(flipped);
    }
    out
}

#[test]
fn corrupted_safetensors_never_panic() {
    let mut rng = Rng::new("safetensors");
    let src = std::fs::read(common::model_dir("blip2-opt-tiny").join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(src[..8].try_into().unwrap()) as usize;
    let dir = common::tempdir();
    let path = dir.path().join("model.safetensors");
    let (mut ok, mut err) = (0, 0);
    // Flips land in the length prefix and the JSON header, where the parser has work to do.
    for bytes in mutations(&src, &mut rng, 8 + header_len, 150) {
        std::fs::write(&path, &bytes).unwrap();
        let result = catch_unwind(AssertUnwindSafe(|| {
            let ckpt = glimpse::weights::Checkpoint::open_file(&path)?;
            // Reading every tensor must stay inside the file too.
            for name in ckpt.names().map(String::from).collect::<Vec<_>>() {
                let shape = ckpt.info(&name).unwrap().shape.clone();
                let _ = ckpt.f16(&name, &shape);
            }
            Ok::<_, glimpse::Error>(())
        }));
        match result {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                assert!(!e.to_string().is_empty());
                err += 1;
            }
            Err(_) => panic!("the loader panicked on a corrupted file ({} bytes)", bytes.len()),
        }
    }
    println!("safetensors mutations: {ok} still valid, {err} rejected with an error");
    assert!(err > 0);
}

#[test]
fn corrupted_images_never_panic() {
    let mut rng = Rng::new("images");
    // The libjpeg-turbo path (baseline, progressive, CMYK, EXIF), 16-bit PNG and the metadata
    // walkers (EXIF in JPEG APP1 and PNG eXIf) get the same treatment as the image-crate formats.
    for name in [
        "odd_257x181.png",
        "rgba_150x120.png",
        "palette_100x80.png",
        "photo_q90.jpg",
        "decode/jpeg_progressive_420.jpg",
        "decode/jpeg_baseline_cmyk.jpg",
        "decode/exif_jpeg_6.jpg",
        "decode/exif_png_7.png",
        "decode/png16_rgba.png",
    ] {
        let src = std::fs::read(common::image(name)).unwrap();
        for bytes in mutations(&src, &mut rng, src.len(), 40) {
            let result = catch_unwind(AssertUnwindSafe(|| glimpse::image::decode_rgb(&bytes, name).map(|_| ())));
            assert!(result.is_ok(), "the decoder panicked on a corrupted {name} ({} bytes)", bytes.len());
        }
    }
}
