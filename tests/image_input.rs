//! Images given in memory (`ImageInput`: encoded bytes, decoded RGB pixels) preprocess and caption
//! exactly as the same file does; what the Python package and other embedders rely on.

mod common;

use glimpse::{Device, ImageInput, Model};

const NAMES: [&str; 5] =
    ["odd_257x181.png", "rgba_150x120.png", "palette_100x80.png", "grey_67x45.png", "photo_q90.jpg"];

#[test]
fn bytes_and_decoded_pixels_give_the_file_pixels() {
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    for name in NAMES {
        let path = common::image(name);
        let want = model.preprocess(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let from_bytes = model.preprocess_input(&ImageInput::Bytes { bytes: &bytes, name }).unwrap();
        let rgb = glimpse::image::load_rgb(&path).unwrap();
        let (width, height) = (rgb.width() as usize, rgb.height() as usize);
        let from_rgb = model.preprocess_input(&ImageInput::Rgb { width, height, data: rgb.as_raw(), name }).unwrap();
        assert_eq!(from_bytes, want, "{name}: bytes");
        assert_eq!(from_rgb, want, "{name}: decoded pixels");
    }
}

#[test]
fn caption_pixels_is_caption() {
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let opts = model.default_options();
    let path = common::image("wide_301x97.png");
    let want = model.caption(&path, &opts).unwrap();
    let mut streamed = Vec::new();
    let got = model.caption_pixels(&model.preprocess(&path).unwrap(), &opts, &mut |t| streamed.push(t.token)).unwrap();
    assert_eq!((&got.text, &got.tokens), (&want.text, &want.tokens));
    assert_eq!(streamed, want.tokens, "on_token sees every token");
    let answer = model.ask(&path, "what is it?", &opts).unwrap();
    let px = model.preprocess(&path).unwrap();
    assert_eq!(
        model.ask_pixels(std::slice::from_ref(&px), "what is it?", &opts, &mut |_| {}).unwrap().tokens,
        answer.tokens
    );
    let err = model.ask_pixels(&[px.clone(), px], "what?", &opts, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("one image at a time; got 2 images"), "{err}");
}

#[test]
fn bad_pixels_are_errors_naming_the_image() {
    let model = Model::load(common::model_dir("blip2-opt-tiny"), Device::Cpu).unwrap();
    let err = |input: ImageInput<'_>| model.preprocess_input(&input).unwrap_err().to_string();
    let short = err(ImageInput::Rgb { width: 4, height: 2, data: &[0; 23], name: "<array>" });
    assert_eq!(
        short,
        "image <array>: 23 bytes of pixels for a 4x2 RGB image, which takes 24 (height x width x 3, uint8)"
    );
    let empty = err(ImageInput::Rgb { width: 0, height: 2, data: &[], name: "<array>" });
    assert_eq!(empty, "image <array>: the pixels are 0x2: an image needs at least one pixel");
    let huge = err(ImageInput::Rgb { width: 1 << 20, height: 1 << 20, data: &[], name: "big" });
    assert!(huge.starts_with("image big: image is 1048576x1048576"), "{huge}");
    let junk = err(ImageInput::Bytes { bytes: b"not an image", name: "<bytes #0>" });
    assert!(junk.starts_with("image <bytes #0>: "), "{junk}");
}
