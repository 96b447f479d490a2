//! All pairs of 64-bit hashes within Hamming distance `t`, exactly, by multi-index hashing.
//!
//! The 64 bits are split into `m` contiguous chunks. If two hashes differ in at most `t` bits,
//! at least one chunk differs in at most `r = t / m` bits (pigeonhole). Each chunk gets an
//! index (a counting-sort table for ≤ 24-bit chunks, else a sorted array); a query probes, in
//! every chunk, all values within `r` bit flips of its own chunk, and verifies each candidate
//! with a popcount. `m` is chosen so that a chunk has about log2(n) bits, which keeps buckets at
//! about one entry and the work near-linear for spread hashes (Norouzi et al., "Fast Search in
//! Hamming Space with Multi-Index Hashing"). Each pair is reported once: by the query with the
//! smaller index, from the first chunk whose distance is ≤ r. Queries run in parallel (rayon).

use rayon::prelude::*;

/// A pair (i < j) and its Hamming distance.
pub type Pair = (u32, u32, u8);

struct Chunk {
    shift: u32,
    bits: u32,
    /// (hash, id) sorted by this chunk's value, then id: a bucket's candidates are contiguous
    /// and verified without another random access.
    entries: Vec<(u64, u32)>,
    /// For chunks of ≤ 24 bits: offsets[v]..offsets[v+1] is bucket v in `entries`.
    offsets: Option<Vec<u32>>,
    /// For chunks of ≤ 24 bits: one bit per bucket, set when it is not empty (small enough to
    /// stay in cache, so most empty probes never touch `offsets`).
    occupied: Vec<u64>,
}

impl Chunk {
    #[inline]
    fn value(&self, h: u64) -> u64 {
        chunk_value(h, self.shift, self.bits)
    }

    fn build(hashes: &[u64], shift: u32, bits: u32) -> Chunk {
        let mut entries: Vec<(u64, u32)> = hashes
            .iter()
            .enumerate()
            .map(|(i, &h)| (h, i as u32))
            .collect();
        entries.par_sort_unstable_by_key(|&(h, i)| (chunk_value(h, shift, bits), i));
        let offsets = (bits <= 24).then(|| {
            let size = 1usize << bits;
            let mut offsets = vec![0u32; size + 1];
            for &(h, _) in &entries {
                offsets[chunk_value(h, shift, bits) as usize + 1] += 1;
            }
            for v in 0..size {
                offsets[v + 1] += offsets[v];
            }
            offsets
        });
        let mut occupied = Vec::new();
        if offsets.is_some() {
            occupied = vec![0u64; (1usize << bits).div_ceil(64)];
            for &(h, _) in &entries {
                let v = chunk_value(h, shift, bits) as usize;
                occupied[v / 64] |= 1 << (v % 64);
            }
        }
        Chunk {
            shift,
            bits,
            entries,
            offsets,
            occupied,
        }
    }

    #[inline]
    fn maybe_occupied(&self, v: u64) -> bool {
        self.occupied.is_empty() || self.occupied[(v / 64) as usize] & (1 << (v % 64)) != 0
    }

    /// The entries whose chunk value is `v`.
    #[inline]
    fn bucket(&self, v: u64) -> &[(u64, u32)] {
        match &self.offsets {
            Some(o) => &self.entries[o[v as usize] as usize..o[v as usize + 1] as usize],
            None => {
                let a = self.entries.partition_point(|e| self.value(e.0) < v);
                let b = a + self.entries[a..].partition_point(|e| self.value(e.0) == v);
                &self.entries[a..b]
            }
        }
    }
}

#[inline]
fn chunk_value(h: u64, shift: u32, bits: u32) -> u64 {
    if bits == 64 {
        h
    } else {
        (h >> shift) & ((1u64 << bits) - 1)
    }
}

/// Call `f` with every value within `r` bit flips of `v` (in the low `bits` bits).
fn for_each_neighbour(v: u64, bits: u32, r: u32, f: &mut impl FnMut(u64)) {
    fn rec(v: u64, start: u32, bits: u32, left: u32, f: &mut impl FnMut(u64)) {
        f(v);
        if left == 0 {
            return;
        }
        for b in start..bits {
            rec(v ^ (1u64 << b), b + 1, bits, left - 1, f);
        }
    }
    rec(v, 0, bits, r, f);
}

/// Number of chunks for `n` hashes at threshold `t`: chunks of about log2(n) bits, at most t+1.
pub fn choose_chunks(n: usize, t: u32) -> u32 {
    let logn = (n.max(2) as f64).log2().max(1.0);
    let m = (64.0 / logn).round().max(1.0) as u32;
    m.clamp(1, (t + 1).min(64))
}

/// All pairs (i < j) with popcount(h[i] ^ h[j]) ≤ t, sorted by (i, j).
pub fn pairs_within(hashes: &[u64], t: u32) -> Vec<Pair> {
    if hashes.len() < 2 {
        return Vec::new();
    }
    if t >= 64 {
        return brute_force(hashes, t);
    }
    let m = choose_chunks(hashes.len(), t);
    let r = t / m;
    let mut layout = Vec::with_capacity(m as usize);
    let mut shift = 0;
    for c in 0..m {
        let bits = 64 / m + u32::from(c < 64 % m);
        layout.push((shift, bits));
        shift += bits;
    }
    let chunks: Vec<Chunk> = layout
        .iter()
        .map(|&(s, b)| Chunk::build(hashes, s, b))
        .collect();
    let mut out: Vec<Pair> = Vec::new();
    for (ci, chunk) in chunks.iter().enumerate() {
        // Flip masks with at most r bits, as one flat list (no recursion in the hot loop).
        let mut masks = Vec::new();
        if r > 2 {
            for_each_neighbour(0, chunk.bits, r, &mut |e| masks.push(e));
        }
        // Queries in this chunk's sorted order: the probed buckets move in a cache-friendly
        // sweep. Each unordered pair is met once per chunk: from the query in the smaller
        // bucket, or — same bucket — from the smaller id.
        let mut part: Vec<Pair> = chunk
            .entries
            .par_chunks(4096)
            .fold(Vec::new, |mut acc, block| {
                for &(h, i) in block {
                    let qv = chunk.value(h);
                    let mut probe = |v: u64, same: bool| {
                        if !chunk.maybe_occupied(v) {
                            return;
                        }
                        for &(g, j) in chunk.bucket(v) {
                            if same && j <= i {
                                continue;
                            }
                            let d = (h ^ g).count_ones();
                            if d > t {
                                continue;
                            }
                            // Report from the first chunk within r only.
                            let first = layout[..ci].iter().all(|&(s, b)| {
                                (chunk_value(h, s, b) ^ chunk_value(g, s, b)).count_ones() > r
                            });
                            if first {
                                acc.push((i.min(j), i.max(j), d as u8));
                            }
                        }
                    };
                    probe(qv, true);
                    if (1..=2).contains(&r) {
                        // v > qv exactly when the highest flipped bit is 0 in qv: enumerate
                        // only those (no unpredictable `v < qv` branch).
                        for b in 0..chunk.bits {
                            if qv >> b & 1 == 1 {
                                continue;
                            }
                            let v1 = qv | (1u64 << b);
                            probe(v1, false);
                            if r == 2 {
                                for c in 0..b {
                                    probe(v1 ^ (1u64 << c), false);
                                }
                            }
                        }
                    } else if r > 2 {
                        for &e in &masks[1..] {
                            let v = qv ^ e;
                            if v > qv {
                                probe(v, false);
                            }
                        }
                    }
                }
                acc
            })
            .reduce(Vec::new, |mut a, mut b| {
                a.append(&mut b);
                a
            });
        out.append(&mut part);
    }
    out.par_sort_unstable();
    out
}

/// The O(n²) reference: every pair within `t`, sorted by (i, j).
pub fn brute_force(hashes: &[u64], t: u32) -> Vec<Pair> {
    let mut out: Vec<Pair> = (0..hashes.len())
        .into_par_iter()
        .flat_map_iter(|i| {
            let h = hashes[i];
            hashes[i + 1..]
                .iter()
                .enumerate()
                .filter_map(move |(k, &g)| {
                    let d = (h ^ g).count_ones();
                    (d <= t).then_some((i as u32, (i + 1 + k) as u32, d as u8))
                })
        })
        .collect();
    out.par_sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut z = *seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z ^ (z >> 31)
    }

    #[test]
    fn matches_brute_force() {
        let mut s = 7;
        for &(n, t) in &[
            (0, 4),
            (1, 4),
            (50, 0),
            (300, 3),
            (500, 8),
            (400, 12),
            (200, 30),
        ] {
            let mut hs: Vec<u64> = (0..n).map(|_| lcg(&mut s)).collect();
            // near copies, exact copies
            for i in 0..n / 3 {
                let flips = (lcg(&mut s) % 12) as u32;
                let mut h = hs[i];
                for _ in 0..flips {
                    h ^= 1 << (lcg(&mut s) % 64);
                }
                hs.push(h);
            }
            if n > 2 {
                hs.push(hs[1]);
            }
            assert_eq!(pairs_within(&hs, t), brute_force(&hs, t), "n={n} t={t}");
        }
    }

    #[test]
    fn clustered_hashes() {
        // Hashes that share most bits stress the buckets.
        let mut s = 3;
        let hs: Vec<u64> = (0..400)
            .map(|_| lcg(&mut s) & 0xFF00_0000_0000_00FF)
            .collect();
        for t in [0, 2, 5, 9] {
            assert_eq!(pairs_within(&hs, t), brute_force(&hs, t));
        }
    }

    #[test]
    fn chunk_choice() {
        assert_eq!(choose_chunks(1_000_000, 8), 3);
        assert_eq!(choose_chunks(200_000, 8), 4);
        assert_eq!(choose_chunks(10, 0), 1);
        assert!(choose_chunks(1000, 8) <= 9);
    }
}
