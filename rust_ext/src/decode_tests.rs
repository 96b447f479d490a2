//! Unit tests of decode.rs (kept apart so that decode.rs stays short).

use super::*;

#[test]
fn luma_weights_sum_to_identity_on_gray() {
    for v in 0..=255u8 {
        assert_eq!(l24(v, v, v), v);
    }
}

#[test]
fn fast_scale_is_the_smallest_keeping_the_minimum_side() {
    assert_eq!(fast_denom(1155, 866, 128), 4); // 1/8 would give 109 px
    assert_eq!(fast_denom(4000, 3000, 128), 8);
    assert_eq!(fast_denom(300, 200, 128), 1);
    assert_eq!(fast_denom(1155, 866, 64), 8);
}

#[test]
fn ycc_to_rgb_is_libjpegs() {
    for y in [0u8, 17, 128, 255] {
        assert_eq!(ycc_rgb(y, 128, 128), (y, y, y));
    }
    // libjpeg's tables: Cr = 255 → R + 178 (1.402 · 127), G − 91 (0.71414 · 127)
    assert_eq!(ycc_rgb(50, 128, 255), (228, 0, 50));
    assert_eq!(ycc_rgb(100, 0, 128), (100, 144, 0));
}

#[test]
fn unknown_format_is_unsupported() {
    let e = decode_bytes(b"GIF89a....", None).unwrap_err();
    assert_eq!(e.kind(), "unsupported");
    assert_eq!(decode_bytes(b"", None).unwrap_err().kind(), "empty");
}

#[test]
fn bad_jpeg_is_an_error_not_a_panic() {
    let e = decode_bytes(&[0xFF, 0xD8, 0xFF, 0xE0, 0, 1, 2], None).unwrap_err();
    assert!(matches!(e.kind(), "corrupt" | "truncated"), "{e}");
}

#[test]
fn png_roundtrip_gray_and_rgb() {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, 2, 1);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[255, 0, 0, 10, 20, 30]).unwrap();
    }
    let l = decode_bytes(&bytes, None).unwrap();
    assert_eq!((l.width, l.height), (2, 1));
    assert_eq!(l.data, vec![l24(255, 0, 0), l24(10, 20, 30)]);
}
