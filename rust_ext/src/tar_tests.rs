//! Unit tests of `tar` (kept apart so the module stays short).
use super::*;
use std::io::Write;

fn png(w: u32, h: u32) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
    v.extend_from_slice(&w.to_be_bytes());
    v.extend_from_slice(&h.to_be_bytes());
    v.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
    v
}

fn header(name: &[u8], size: u64, flag: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    h[100..108].copy_from_slice(b"0000644\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = flag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

fn member(out: &mut Vec<u8>, name: &[u8], data: &[u8]) {
    out.extend_from_slice(&header(name, data.len() as u64, b'0'));
    out.extend_from_slice(data);
    out.resize(padded(out.len() as u64) as usize, 0);
}

#[test]
fn index_and_scan_members_in_place() {
    let d = tempfile::tempdir().unwrap();
    let mut t = Vec::new();
    member(&mut t, b"0001.png", &png(30, 20));
    member(&mut t, b"0001.txt", b"a cat");
    let long = [b"x".repeat(150).as_slice(), b".png"].concat();
    let mut pax_rec = format!(" path={}\n", String::from_utf8_lossy(&long));
    let n = pax_rec.len() + 3;
    pax_rec = format!("{n}{pax_rec}");
    t.extend_from_slice(&header(b"PaxHeader", pax_rec.len() as u64, b'x'));
    t.extend_from_slice(pax_rec.as_bytes());
    t.resize(padded(t.len() as u64) as usize, 0);
    member(&mut t, b"ignored-name", &png(7, 9));
    member(&mut t, b"0003.jpg", b"not an image at all");
    t.extend_from_slice(&[0u8; 1024]);
    let p = d.path().join("s.tar");
    File::create(&p).unwrap().write_all(&t).unwrap();
    let idx = index_tar(&p).unwrap();
    assert!(idx.problem.is_none(), "{:?}", idx.problem);
    let names: Vec<_> = idx.members.iter().map(|m| m.name.clone()).collect();
    assert_eq!(
        names,
        vec![
            b"0001.png".to_vec(),
            b"0001.txt".to_vec(),
            long,
            b"0003.jpg".to_vec()
        ]
    );
    let ranges: Vec<Range> = idx
        .members
        .iter()
        .map(|m| (p.clone(), m.offset, m.size))
        .collect();
    let recs = scan_ranges(&ranges, &ScanOptions::default());
    assert_eq!(
        (recs[0].status, recs[0].width, recs[0].height),
        (Status::Ok, 30, 20)
    );
    assert_eq!(
        recs[0].content_hash,
        Some(xxhash_rust::xxh3::xxh3_128(&png(30, 20)))
    );
    assert_eq!((recs[2].status, recs[2].width), (Status::Ok, 7));
    assert_eq!(recs[3].status, Status::NotImage);
}

#[test]
fn truncated_shard_keeps_earlier_members() {
    let d = tempfile::tempdir().unwrap();
    let mut t = Vec::new();
    member(&mut t, b"a.png", &png(3, 4));
    let big = [png(5, 6), vec![7u8; 2000]].concat();
    member(&mut t, b"b.png", &big);
    t.truncate(t.len() - 1500);
    let p = d.path().join("cut.tar");
    std::fs::write(&p, &t).unwrap();
    let idx = index_tar(&p).unwrap();
    assert_eq!(idx.members.len(), 2);
    assert_eq!(idx.problem.as_ref().unwrap().0, Status::Truncated);
    let m = &idx.members[1];
    let rec = scan_range(&p, m.offset, m.size, &ScanOptions::default());
    assert_eq!(
        (rec.status, rec.width, rec.file_size),
        (Status::Truncated, 5, big.len() as u64)
    );
    // A header cut in the middle.
    std::fs::write(&p, &t[..1100]).unwrap();
    let idx = index_tar(&p).unwrap();
    assert_eq!(idx.members.len(), 1);
    assert_eq!(idx.problem.unwrap().0, Status::Truncated);
}

#[test]
fn damaged_header_is_a_problem_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let mut t = Vec::new();
    member(&mut t, b"a.png", &png(3, 4));
    let at = t.len();
    member(&mut t, b"b.png", &png(3, 4));
    t[at + 10] ^= 0x55;
    let p = d.path().join("bad.tar");
    std::fs::write(&p, &t).unwrap();
    let idx = index_tar(&p).unwrap();
    assert_eq!(idx.members.len(), 1);
    assert_eq!(idx.problem.unwrap().0, Status::Corrupt);
    for junk in [vec![0xFFu8; 3000], vec![], b"hello".to_vec()] {
        std::fs::write(&p, &junk).unwrap();
        let _ = index_tar(&p).unwrap();
    }
}

#[test]
fn buffers_scan_like_files() {
    let bufs = vec![
        png(11, 12),
        vec![],
        b"junk".to_vec(),
        png(11, 12)[..20].to_vec(),
    ];
    let recs = scan_buffers(&bufs, &ScanOptions::default());
    let st: Vec<_> = recs.iter().map(|r| r.status.name()).collect();
    assert_eq!(st, vec!["ok", "empty", "not_image", "truncated"]);
    assert_eq!(parse_num(b"0000012\0"), Some(10));
    assert_eq!(parse_num(&[0x80, 0, 0, 1, 0]), Some(256));
}
