//! EXIF orientation, applied the way transformers' `load_image` does it: `ImageOps.exif_transpose`
//! (Pillow 13) before `convert("RGB")`. Pillow takes the Orientation tag (0x0112) from IFD0 of the
//! image's EXIF block and, when that has none, from the first `tiff:Orientation="N"` /
//! `tiff:Orientation>N` in its XMP packet. Values 2..=8 transpose; anything else leaves the image.
//!
//! Where the EXIF lives (as Pillow reads it): JPEG APP1 `Exif\0\0` segments (the first one, with
//! any later ones appended) and the last APP1 XMP segment; PNG the last `eXIf` chunk (before or
//! after the image data) and an uncompressed `iTXt`/`tEXt` `XML:com.adobe.xmp`; WebP the `EXIF`
//! and `XMP ` chunks. Not read (documented in the README): PNG `Raw profile type exif` text and
//! compressed XMP; corrupt EXIF headers, on which Pillow raises, count as no orientation here.

use image::RgbImage;

/// The orientation (1..=8 when meaningful) recorded in a PNG, JPEG or WebP file, if any.
pub fn orientation(bytes: &[u8]) -> Option<u16> {
    let (exif, xmp) = if bytes.starts_with(&[0xFF, 0xD8]) {
        jpeg_metadata(bytes)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        png_metadata(bytes)
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        webp_metadata(bytes)
    } else {
        return None;
    };
    exif.as_deref().and_then(exif_orientation).or_else(|| xmp.as_deref().and_then(xmp_orientation))
}

fn be16(b: &[u8], at: usize) -> Option<usize> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?) as usize)
}

fn be32(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}

fn le32(b: &[u8], at: usize) -> Option<usize> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
}

const XMP_JPEG: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";

/// JPEG marker segments up to the first start-of-scan, as Pillow's JpegImagePlugin walks them.
fn jpeg_metadata(b: &[u8]) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let (mut exif, mut xmp): (Option<Vec<u8>>, Option<Vec<u8>>) = (None, None);
    let mut at = 2;
    while at + 4 <= b.len() {
        if b[at] != 0xFF {
            at += 1; // junk between segments: skipped, as Pillow does
            continue;
        }
        let marker = b[at + 1];
        if marker == 0xFF || marker == 0x00 {
            at += 1;
            continue;
        }
        if marker == 0xD9 || marker == 0xDA {
            break;
        }
        if (0xD0..=0xD8).contains(&marker) || marker == 0x01 {
            at += 2; // markers without a length
            continue;
        }
        let Some(len) = be16(b, at + 2).filter(|&l| l >= 2) else { break };
        let Some(seg) = b.get(at + 4..at + 2 + len) else { break };
        if marker == 0xE1 {
            if let Some(rest) = seg.strip_prefix(b"Exif\0\0") {
                match &mut exif {
                    Some(e) => e.extend_from_slice(rest),
                    None => exif = Some(rest.to_vec()),
                }
            } else if let Some(rest) = seg.strip_prefix(XMP_JPEG) {
                xmp = Some(rest.to_vec());
            }
        }
        at += 2 + len;
    }
    (exif, xmp)
}

fn png_metadata(b: &[u8]) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let (mut exif, mut xmp) = (None, None);
    let mut at = 8;
    while let (Some(len), Some(kind)) = (be32(b, at), b.get(at + 4..at + 8)) {
        let Some(data) = b.get(at + 8..(at + 8).saturating_add(len)) else { break };
        match kind {
            b"eXIf" => exif = Some(data.strip_prefix(b"Exif\0\0").unwrap_or(data).to_vec()),
            b"iTXt" => {
                // keyword \0 compressed method language \0 translated \0 text
                if let Some(rest) = data.strip_prefix(b"XML:com.adobe.xmp\0") {
                    if rest.first() == Some(&0) {
                        let text = rest.get(2..).unwrap_or_default();
                        let mut parts = text.splitn(3, |&c| c == 0);
                        if let (Some(_), Some(_), Some(t)) = (parts.next(), parts.next(), parts.next()) {
                            xmp = Some(t.to_vec());
                        }
                    }
                }
            }
            b"tEXt" => {
                if let Some(t) = data.strip_prefix(b"XML:com.adobe.xmp\0") {
                    xmp = Some(t.to_vec());
                }
            }
            b"IEND" => break,
            _ => {}
        }
        at = at.saturating_add(12).saturating_add(len);
    }
    (exif, xmp)
}

fn webp_metadata(b: &[u8]) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    let (mut exif, mut xmp) = (None, None);
    let mut at = 12;
    while let (Some(kind), Some(len)) = (b.get(at..at + 4), le32(b, at + 4)) {
        let Some(data) = b.get(at + 8..(at + 8).saturating_add(len)) else { break };
        match kind {
            b"EXIF" => exif = Some(data.strip_prefix(b"Exif\0\0").unwrap_or(data).to_vec()),
            b"XMP " => xmp = Some(data.to_vec()),
            _ => {}
        }
        at = at.saturating_add(8).saturating_add(len).saturating_add(len & 1);
    }
    (exif, xmp)
}

/// Orientation from a TIFF structure (`II*\0` / `MM\0*`): IFD0's tag 0x0112 when it holds one
/// integer (Pillow returns a tuple for other counts, which no transpose matches).
fn exif_orientation(t: &[u8]) -> Option<u16> {
    let le = match t.get(..4)? {
        b"II*\0" => true,
        b"MM\0*" => false,
        _ => return None,
    };
    let u16_at = |at: usize| -> Option<u32> {
        let s: [u8; 2] = t.get(at..at + 2)?.try_into().ok()?;
        Some(u32::from(if le { u16::from_le_bytes(s) } else { u16::from_be_bytes(s) }))
    };
    let u32_at = |at: usize| -> Option<u32> {
        let s: [u8; 4] = t.get(at..at + 4)?.try_into().ok()?;
        Some(if le { u32::from_le_bytes(s) } else { u32::from_be_bytes(s) })
    };
    let ifd = u32_at(4)? as usize;
    let count = u16_at(ifd)? as usize;
    for i in 0..count {
        let e = ifd + 2 + 12 * i;
        let (Some(tag), Some(typ), Some(n)) = (u16_at(e), u16_at(e + 2), u32_at(e + 4)) else { break };
        if tag != 0x0112 {
            continue;
        }
        if n != 1 {
            return None;
        }
        // BYTE, SHORT, LONG, SBYTE, SSHORT, SLONG: one value, stored inline.
        let v = match typ {
            1 | 6 => u32::from(*t.get(e + 8)?),
            3 | 8 => u16_at(e + 8)?,
            4 | 9 => u32_at(e + 8)?,
            _ => return None,
        };
        return u16::try_from(v).ok();
    }
    None
}

/// Pillow's fallback: the first match of `tiff:Orientation(="|>)([0-9])` in the XMP packet.
fn xmp_orientation(x: &[u8]) -> Option<u16> {
    const KEY: &[u8] = b"tiff:Orientation";
    let mut from = 0;
    while let Some(pos) = x[from..].windows(KEY.len()).position(|w| w == KEY) {
        let after = &x[from + pos + KEY.len()..];
        let digit = match after {
            [b'=', b'"', d, ..] | [b'>', d, ..] if d.is_ascii_digit() => Some(d),
            _ => None,
        };
        if let Some(d) = digit {
            return Some(u16::from(d - b'0'));
        }
        from += pos + 1;
    }
    None
}

/// `Image.transpose` for the method exif_transpose picks for `orientation`; 1 and unknown values
/// return the image unchanged.
pub fn apply(img: RgbImage, orientation: Option<u16>) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    // Source pixel (x, y) of output pixel (ox, oy), and whether width and height swap.
    let map: fn(usize, usize, usize, usize) -> (usize, usize) = match orientation {
        Some(2) => |ox, oy, w, _| (w - 1 - ox, oy),         // FLIP_LEFT_RIGHT
        Some(3) => |ox, oy, w, h| (w - 1 - ox, h - 1 - oy), // ROTATE_180
        Some(4) => |ox, oy, _, h| (ox, h - 1 - oy),         // FLIP_TOP_BOTTOM
        Some(5) => |ox, oy, _, _| (oy, ox),                 // TRANSPOSE
        Some(6) => |ox, oy, _, h| (oy, h - 1 - ox),         // ROTATE_270 (clockwise)
        Some(7) => |ox, oy, w, h| (w - 1 - oy, h - 1 - ox), // TRANSVERSE
        Some(8) => |ox, oy, w, _| (w - 1 - oy, ox),         // ROTATE_90 (counter-clockwise)
        _ => return img,
    };
    let swap = matches!(orientation, Some(5..=8));
    let (ow, oh) = if swap { (h, w) } else { (w, h) };
    let src = img.as_raw();
    let mut out = vec![0u8; ow * oh * 3];
    for oy in 0..oh {
        for ox in 0..ow {
            let (sx, sy) = map(ox, oy, w, h);
            let s = (sy * w + sx) * 3;
            out[(oy * ow + ox) * 3..][..3].copy_from_slice(&src[s..s + 3]);
        }
    }
    RgbImage::from_raw(ow as u32, oh as u32, out).expect("buffer sized for the image")
}
