//! JPEG through libjpeg-turbo's decoder (the copy inside mozjpeg-sys, built from source), set up
//! the way Pillow 13's `JpegDecode.c` sets it up: ISLOW IDCT, fancy upsampling, libjpeg's own
//! colour conversion to RGB / grey / CMYK. The pixels then equal `Image.open(f).convert("RGB")`.
//!
//! libjpeg reports fatal errors through `error_exit`, which must not return; here it unwinds (the
//! C code is compiled with `-fexceptions`, mozjpeg-sys's `unwinding` feature) with a private
//! payload that [`decode`] catches and turns into an error. `resume_unwind` skips the panic hook,
//! so nothing is printed.

use std::os::raw::{c_int, c_long, c_ulong};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use image::RgbImage;
use mozjpeg_sys::*;

/// More scans than this is no real progressive JPEG (encoders write about 10), only a way to make
/// the decoder loop; libjpeg-turbo's own TurboJPEG API caps scans for the same reason.
pub const MAX_SCANS: c_int = 1000;

/// What libjpeg produced: pixels in `components` channels (1 grey, 3 RGB, 4 CMYK as stored).
struct Raw {
    width: u32,
    height: u32,
    components: usize,
    data: Vec<u8>,
}

/// Payload of the unwind started by `error_exit`: libjpeg's own message.
struct JpegFailure(String);

/// Per-decode state reached from libjpeg's callbacks through `client_data`.
#[derive(Default)]
struct State {
    /// libjpeg ran out of data before the end-of-image marker (it then inserts a fake EOI).
    hit_eof: bool,
}

/// Decodes a JPEG to 8-bit RGB as Pillow's `convert("RGB")` does. `max_pixels` is checked on the
/// header before any pixel buffer exists; `max_memory` caps libjpeg's working memory (the
/// coefficient buffer of a progressive file is 2 bytes per pixel and component).
pub fn decode(bytes: &[u8], max_pixels: u64, max_memory: u64) -> Result<RgbImage, String> {
    let raw = match catch_unwind(AssertUnwindSafe(|| decode_raw(bytes, max_pixels, max_memory))) {
        Ok(result) => result?,
        Err(payload) => {
            return Err(match payload.downcast::<JpegFailure>() {
                Ok(failure) => failure.0,
                Err(_) => "the JPEG decoder failed on malformed data".to_string(),
            })
        }
    };
    Ok(to_rgb(raw))
}

/// Owns a libjpeg decompressor; destroying it frees all of libjpeg's memory, also on unwind.
struct Decompress {
    cinfo: Box<jpeg_decompress_struct>,
    _err: Box<jpeg_error_mgr>,
    _progress: Box<jpeg_progress_mgr>,
    state: Box<State>,
}

impl Drop for Decompress {
    fn drop(&mut self) {
        // SAFETY: cinfo was initialised by jpeg_create_decompress (Decompress is only built after
        // it returned), and destroy never calls error_exit.
        unsafe { jpeg_destroy_decompress(&mut self.cinfo) };
    }
}

fn decode_raw(bytes: &[u8], max_pixels: u64, max_memory: u64) -> Result<Raw, String> {
    // SAFETY: all-zero is the documented initial state of these C structs (null pointers, None
    // callbacks) before jpeg_std_error / jpeg_create_decompress fill them.
    let mut err: Box<jpeg_error_mgr> = Box::new(unsafe { std::mem::zeroed() });
    let mut cinfo: Box<jpeg_decompress_struct> = Box::new(unsafe { std::mem::zeroed() });
    let mut progress: Box<jpeg_progress_mgr> = Box::new(unsafe { std::mem::zeroed() });
    let mut state = Box::<State>::default();
    // SAFETY: err outlives cinfo (both owned by Decompress below, destroyed in Drop before the
    // boxes are freed); jpeg_std_error only fills the struct.
    unsafe {
        jpeg_std_error(&mut err);
        err.error_exit = Some(error_exit);
        err.emit_message = Some(emit_message);
        cinfo.common.err = &mut *err;
        jpeg_create_decompress(&mut *cinfo);
    }
    progress.progress_monitor = Some(progress_monitor);
    cinfo.common.progress = &mut *progress;
    cinfo.common.client_data = (&mut *state as *mut State).cast();
    let mut d = Decompress { cinfo, _err: err, _progress: progress, state };
    let cinfo = &mut *d.cinfo;
    // SAFETY: `mem` is set by jpeg_create_decompress; jmemnobs honours max_memory_to_use for the
    // big (virtual array) buffers, failing with an error instead of allocating past it.
    unsafe { (*cinfo.common.mem).max_memory_to_use = c_long::try_from(max_memory).unwrap_or(c_long::MAX) };
    let len = c_ulong::try_from(bytes.len()).map_err(|_| "the file is too large for libjpeg".to_string())?;
    // SAFETY: `bytes` outlives the decompressor (dropped at the end of this function); libjpeg
    // only reads it. Errors inside these calls unwind to `decode`, where `d` is dropped.
    unsafe {
        jpeg_mem_src(cinfo, bytes.as_ptr(), len);
        jpeg_read_header(cinfo, 1);
    }
    let (w, h) = (cinfo.image_width, cinfo.image_height);
    let pixels = u64::from(w) * u64::from(h);
    if pixels > max_pixels {
        return Err(super::too_many_pixels(w, h, max_pixels));
    }
    // Pillow picks its mode from the component count alone (1 L, 3 RGB, 4 CMYK) and lets libjpeg
    // convert from whatever colour space the file declares (YCbCr, RGB, YCCK, ...).
    cinfo.out_color_space = match cinfo.num_components {
        1 => J_COLOR_SPACE::JCS_GRAYSCALE,
        3 => J_COLOR_SPACE::JCS_RGB,
        4 => J_COLOR_SPACE::JCS_CMYK,
        n => return Err(format!("JPEG with {n} colour components is not supported (1, 3 or 4)")),
    };
    cinfo.dct_method = J_DCT_METHOD::JDCT_ISLOW;
    cinfo.do_fancy_upsampling = 1;
    // SAFETY: header read; output dimensions are computed by start_decompress.
    unsafe { jpeg_start_decompress(cinfo) };
    let (ow, oh, comps) = (cinfo.output_width, cinfo.output_height, cinfo.output_components as usize);
    if (ow, oh) != (w, h) || !matches!(comps, 1 | 3 | 4) {
        return Err(format!("libjpeg produced {ow}x{oh}x{comps} for a {w}x{h} image"));
    }
    let stride = ow as usize * comps;
    let mut data = vec![0u8; stride * oh as usize];
    while cinfo.output_scanline < oh {
        let mut row = data[cinfo.output_scanline as usize * stride..].as_mut_ptr();
        // SAFETY: `row` points at `stride` writable bytes (one scanline of output_components).
        let read = unsafe { jpeg_read_scanlines(cinfo, &mut row, 1) };
        if read == 0 {
            return Err("libjpeg returned no scanline".into());
        }
    }
    // Reads up to the end-of-image marker: Pillow too reads the whole stream, so a missing EOI
    // is a truncated file there as well.
    // SAFETY: all scanlines read.
    unsafe { jpeg_finish_decompress(cinfo) };
    if d.state.hit_eof {
        return Err("image file is truncated: the JPEG data ends before its end-of-image marker \
                    (Pillow refuses it the same way)"
            .into());
    }
    Ok(Raw { width: ow, height: oh, components: comps, data })
}

/// Pillow 13 `convert("RGB")`: grey is replicated; a 4-component JPEG is read as inverted CMYK
/// ("CMYK;I", Adobe's convention, assumed for every CMYK JPEG), then `cmyk2rgb` of Convert.c:
/// `R = (255 - K) - (C * (255 - K)) / 255` with Pillow's rounding MULDIV255.
fn to_rgb(raw: Raw) -> RgbImage {
    let Raw { width, height, components, data } = raw;
    let rgb = match components {
        3 => data,
        1 => data.iter().flat_map(|&v| [v, v, v]).collect(),
        _ => data
            .chunks_exact(4)
            .flat_map(|p| {
                // Stored values s are inverted CMYK: C = 255 - s, so 255 - K = s[3].
                let nk = i32::from(p[3]);
                let ch = |s: u8| (nk - muldiv255(255 - i32::from(s), nk)).clamp(0, 255) as u8;
                [ch(p[0]), ch(p[1]), ch(p[2])]
            })
            .collect(),
    };
    RgbImage::from_raw(width, height, rgb).expect("buffer sized for the image")
}

/// Pillow's MULDIV255(a, b): a * b / 255 rounded, in integers.
fn muldiv255(a: i32, b: i32) -> i32 {
    let t = a * b + 128;
    (t + (t >> 8)) >> 8
}

unsafe extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
    let mut buf = [0u8; 80];
    // format_message writes a NUL-terminated string of at most JMSG_LENGTH_MAX (80) bytes; the
    // binding declares the buffer `&[u8; 80]`, so call it through a pointer type that says so.
    type Format = unsafe extern "C-unwind" fn(*mut jpeg_common_struct, *mut u8);
    let err = &*cinfo.err;
    let msg = match err.format_message {
        Some(f) => {
            let f: Format = std::mem::transmute(f);
            f(cinfo, buf.as_mut_ptr());
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        }
        None => format!("libjpeg error {}", err.msg_code),
    };
    resume_unwind(Box::new(JpegFailure(format!("cannot decode JPEG: {msg}"))));
}

/// Warnings (level -1) are silent as in Pillow, except running out of data, which is recorded:
/// Pillow raises "image file is truncated" there. Trace messages (level >= 0) are dropped.
unsafe extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
    if level < 0 && (*cinfo.err).msg_code == JWRN_JPEG_EOF as c_int {
        (*cinfo.client_data.cast::<State>()).hit_eof = true;
    }
}

/// Called by libjpeg between input passes; stops files with absurd scan counts.
unsafe extern "C-unwind" fn progress_monitor(cinfo: &mut jpeg_common_struct) {
    if cinfo.is_decompressor != 0 {
        let d = &*(cinfo as *mut jpeg_common_struct).cast::<jpeg_decompress_struct>();
        if d.input_scan_number > MAX_SCANS {
            resume_unwind(Box::new(JpegFailure(format!(
                "cannot decode JPEG: more than {MAX_SCANS} scans (a progressive file that never ends)"
            ))));
        }
    }
}
