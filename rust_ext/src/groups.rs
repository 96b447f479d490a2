//! Connected components of a pair graph (union-find), and each group's largest internal
//! Hamming distance (so chained "mega-groups", A~B~C with A far from C, are visible).

use rayon::prelude::*;

/// Union-find with path halving and union by size.
pub struct UnionFind {
    parent: Vec<u32>,
    size: Vec<u32>,
}

impl UnionFind {
    pub fn new(n: usize) -> UnionFind {
        UnionFind {
            parent: (0..n as u32).collect(),
            size: vec![1; n],
        }
    }

    pub fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let p = self.parent[x as usize];
            self.parent[x as usize] = self.parent[p as usize];
            x = self.parent[x as usize];
        }
        x
    }

    pub fn union(&mut self, a: u32, b: u32) {
        let (mut a, mut b) = (self.find(a), self.find(b));
        if a == b {
            return;
        }
        if self.size[a as usize] < self.size[b as usize] {
            std::mem::swap(&mut a, &mut b);
        }
        self.parent[b as usize] = a;
        self.size[a as usize] += self.size[b as usize];
    }
}

/// Component labels 0.. for `n` nodes joined by `edges`, numbered in order of each
/// component's smallest node; singletons get -1.
pub fn components(n: usize, edges: &[(u32, u32)]) -> Vec<i64> {
    let mut uf = UnionFind::new(n);
    for &(a, b) in edges {
        uf.union(a, b);
    }
    let roots: Vec<u32> = (0..n as u32).map(|i| uf.find(i)).collect();
    let mut count = vec![0u32; n];
    for &r in &roots {
        count[r as usize] += 1;
    }
    let mut label = vec![-1i64; n];
    let mut next = 0i64;
    let mut out = vec![-1i64; n];
    for (i, &r) in roots.iter().enumerate() {
        if count[r as usize] < 2 {
            continue;
        }
        if label[r as usize] < 0 {
            label[r as usize] = next;
            next += 1;
        }
        out[i] = label[r as usize];
    }
    out
}

/// Above this many distinct hashes a group's diameter is estimated (double sweep, a lower
/// bound) instead of computed over all pairs.
pub const EXACT_DIAMETER_LIMIT: usize = 20_000;

/// For each group label 0..n_groups: (largest Hamming distance between two of its hashes,
/// exact?). Labels < 0 are ignored.
pub fn max_distances(hashes: &[u64], labels: &[i64]) -> Vec<(u8, bool)> {
    let n_groups = labels.iter().copied().max().map_or(0, |m| (m + 1).max(0)) as usize;
    let mut members: Vec<Vec<u64>> = vec![Vec::new(); n_groups];
    for (&h, &l) in hashes.iter().zip(labels) {
        if l >= 0 {
            members[l as usize].push(h);
        }
    }
    members
        .into_par_iter()
        .map(|mut g| {
            g.sort_unstable();
            g.dedup();
            if g.len() <= EXACT_DIAMETER_LIMIT {
                let d = (0..g.len())
                    .map(|i| {
                        g[i + 1..]
                            .iter()
                            .map(|&b| (g[i] ^ b).count_ones())
                            .max()
                            .unwrap_or(0)
                    })
                    .max()
                    .unwrap_or(0);
                (d as u8, true)
            } else {
                let far = |x: u64| {
                    *g.iter()
                        .max_by_key(|&&b| (x ^ b).count_ones())
                        .expect("non-empty")
                };
                let a = far(g[0]);
                let b = far(a);
                ((a ^ b).count_ones() as u8, false)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_is_one_component() {
        let l = components(6, &[(0, 1), (1, 2), (4, 5)]);
        assert_eq!(l, vec![0, 0, 0, -1, 1, 1]);
    }

    #[test]
    fn diameter_of_chain() {
        let h = [0u64, 0b1111, 0xFF, 1 << 63];
        let l = [0, 0, 0, -1];
        assert_eq!(max_distances(&h, &l), vec![(8, true)]);
    }
}
