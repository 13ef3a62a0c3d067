//! Tables built on the control thread so that a choice on the data plane is a lookup: the
//! stable hash every node agrees on, the Maglev table of consistent hashing, the smooth
//! weighted round-robin order.

/// Entries of a Maglev table: a prime, at least 256 per endpoint at the route limit of 256,
/// so shares stay within about 1% of the weights (Maglev paper, §5.3: M ≫ 100·N).
pub const MAGLEV_SIZE: usize = 65_537;
/// Longest round-robin order; larger weight sums are scaled down to fit (ratios kept to
/// within 1/`SCHEDULE_LEN_MAX`).
pub const SCHEDULE_LEN_MAX: usize = 4_096;

/// 64-bit FNV-1a with a final mix: the same on every node, every process, every build, so a
/// key hashes to the same endpoint across workers, restarts and the fleet.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// The murmur3 finaliser: FNV's low bits are weak, modulo a table size needs them good.
pub fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A Maglev lookup table (Eisenbud et al., NSDI 2016) over members named by `names` with
/// `weights`: entry `i` is the member that owns hash `h` when `h % MAGLEV_SIZE == i`. Adding
/// one of N members moves about 1/(N+1) of the keys. Weighted as Envoy does: a member of
/// half the largest weight takes a turn every other round.
pub fn maglev(names: &[&[u8]], weights: &[u32]) -> Box<[u8]> {
    assert_eq!(names.len(), weights.len());
    assert!(names.len() <= 256, "member indices are u8");
    let m = MAGLEV_SIZE as u64;
    let mut table = vec![u8::MAX; MAGLEV_SIZE];
    let n = names.len();
    if n == 0 {
        return Box::new([]);
    }
    let perm: Vec<(u64, u64)> = names
        .iter()
        .map(|name| {
            let h = stable_hash(name);
            let offset = h % m;
            let skip = mix(h ^ 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let wmax = u64::from(weights.iter().copied().max().unwrap_or(1).max(1));
    let mut next = vec![0u64; n];
    let mut target = vec![0u64; n];
    let mut filled = vec![false; MAGLEV_SIZE];
    let mut count = 0usize;
    let mut iteration = 1u64;
    while count < MAGLEV_SIZE {
        for i in 0..n {
            let w = u64::from(weights[i].max(1));
            if iteration * w < target[i] {
                continue;
            }
            target[i] += wmax;
            let (offset, skip) = perm[i];
            // Each member's permutation visits every entry once, so this ends.
            loop {
                let c = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if !filled[c] {
                    filled[c] = true;
                    table[c] = i as u8;
                    count += 1;
                    break;
                }
            }
            if count == MAGLEV_SIZE {
                break;
            }
        }
        iteration += 1;
    }
    table.into_boxed_slice()
}

/// The smooth weighted round-robin order (nginx's algorithm, run once for a whole period):
/// each member appears in proportion to its weight, spread out rather than in bursts.
pub fn smooth_schedule(weights: &[u32]) -> Box<[u8]> {
    assert!(weights.len() <= 256, "member indices are u8");
    let mut w: Vec<u64> = weights.iter().map(|&x| u64::from(x.max(1))).collect();
    if w.is_empty() {
        return Box::new([]);
    }
    let g = w.iter().copied().fold(0, gcd);
    w.iter_mut().for_each(|x| *x /= g);
    let total: u64 = w.iter().sum();
    if total as usize > SCHEDULE_LEN_MAX {
        let t = total;
        w.iter_mut()
            .for_each(|x| *x = (*x * SCHEDULE_LEN_MAX as u64 / t).max(1));
    }
    let total: u64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        order.push(best as u8);
    }
    order.into_boxed_slice()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable() {
        // Pinned: a change here moves every hashed key in the fleet.
        assert_eq!(stable_hash(b""), mix(0xcbf2_9ce4_8422_2325));
        assert_eq!(stable_hash(b"10.0.0.1"), stable_hash(b"10.0.0.1"));
        assert_ne!(stable_hash(b"10.0.0.1"), stable_hash(b"10.0.0.2"));
    }

    #[test]
    fn smooth_order_spreads_weights() {
        assert_eq!(&*smooth_schedule(&[1, 1, 1]), &[0, 1, 2]);
        assert_eq!(&*smooth_schedule(&[5, 1, 1]), &[0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(&*smooth_schedule(&[2, 2]), &[0, 1]);
        let big = smooth_schedule(&[1000, 999, 1]);
        assert!(big.len() <= SCHEDULE_LEN_MAX);
        assert!(big.contains(&2));
    }

    fn shares(t: &[u8], n: usize) -> Vec<f64> {
        let mut c = vec![0usize; n];
        t.iter().for_each(|&i| c[i as usize] += 1);
        c.iter().map(|&x| x as f64 / t.len() as f64).collect()
    }

    #[test]
    fn maglev_balances_by_weight_and_moves_few_keys() {
        let names: Vec<String> = (0..4).map(|i| format!("10.0.0.{i}:80")).collect();
        let refs: Vec<&[u8]> = names.iter().map(|s| s.as_bytes()).collect();
        let t3 = maglev(&refs[..3], &[1, 1, 1]);
        for s in shares(&t3, 3) {
            assert!((s - 1.0 / 3.0).abs() < 0.01, "{s}");
        }
        let w = maglev(&refs[..2], &[1, 3]);
        let s = shares(&w, 2);
        assert!((s[1] - 0.75).abs() < 0.01, "{s:?}");
        let t4 = maglev(&refs, &[1, 1, 1, 1]);
        let moved = t3.iter().zip(t4.iter()).filter(|(a, b)| a != b).count();
        let frac = moved as f64 / MAGLEV_SIZE as f64;
        assert!(frac < 0.30, "moved {frac}");
        assert!(frac > 0.20, "moved {frac}");
    }
}
