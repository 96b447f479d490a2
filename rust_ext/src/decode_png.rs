//! PNG to 8-bit luma, as Pillow opens a PNG and converts it to "L" (see decode.rs).

use super::{check_pixels, grid_color, l24};
use crate::error::{Error, Result};
use crate::phash::Luma;
use crate::quality::ColorAcc;

/// Decode a PNG to luma the way Pillow opens it and converts it to "L".
pub fn decode_png(bytes: &[u8], acc: Option<&mut ColorAcc>) -> Result<Luma> {
    use png::{BitDepth, ColorType, Transformations};
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(Transformations::EXPAND);
    dec.set_ignore_text_chunk(true);
    let mut reader = dec
        .read_info()
        .map_err(|e| Error::Corrupt(format!("PNG: {e}")))?;
    let (orig_ct, orig_depth) = {
        let info = reader.info();
        (info.color_type, info.bit_depth)
    };
    {
        let info = reader.info();
        check_pixels(info.width as u64 * info.height as u64)?;
    }
    let size = reader.output_buffer_size();
    let mut buf = vec![0u8; size];
    let frame = reader.next_frame(&mut buf).map_err(|e| {
        let s = e.to_string();
        if s.contains("EOF") || s.contains("end of") {
            Error::Truncated(format!("PNG data: {s}"))
        } else {
            Error::Corrupt(format!("PNG data: {s}"))
        }
    })?;
    let (w, h) = (frame.width as usize, frame.height as usize);
    let (ct, depth) = (frame.color_type, frame.bit_depth);
    let bpp = if depth == BitDepth::Sixteen { 2 } else { 1 };
    let channels = ct.samples();
    let stride = frame.line_size;
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        let row = &buf[y * stride..y * stride + w * channels * bpp];
        let px = row.chunks_exact(channels * bpp);
        match (ct, bpp) {
            (ColorType::Grayscale | ColorType::GrayscaleAlpha, 2)
                if orig_ct == ColorType::Grayscale && orig_depth == BitDepth::Sixteen =>
            {
                // Pillow: mode "I;16", and "I;16" → "L" clips at 255.
                out.extend(px.map(|p| {
                    let v = u16::from_be_bytes([p[0], p[1]]);
                    v.min(255) as u8
                }))
            }
            (ColorType::Grayscale | ColorType::GrayscaleAlpha, _) => out.extend(px.map(|p| p[0])),
            (ColorType::Rgb | ColorType::Rgba, 1) => out.extend(px.map(|p| l24(p[0], p[1], p[2]))),
            (ColorType::Rgb | ColorType::Rgba, _) => out.extend(px.map(|p| l24(p[0], p[2], p[4]))),
            _ => return Err(Error::Unsupported(format!("PNG colour type {ct:?}"))),
        }
    }
    if let Some(a) = acc {
        if matches!(ct, ColorType::Grayscale | ColorType::GrayscaleAlpha) {
            a.add_gray(crate::quality::grid_points(w, h));
        } else {
            let dims = (w, h, stride, channels * bpp);
            let hi = if bpp == 1 { [0, 1, 2] } else { [0, 2, 4] };
            grid_color(&buf, dims, a, |p| (p[hi[0]], p[hi[1]], p[hi[2]]));
        }
    }
    Ok(Luma::new(w, h, out))
}
