//! Stable 64-bit hashes. Every router replica (and every version of it) must compute the same
//! values, so nothing here may depend on std's randomly keyed or unspecified hashers.

/// Eight bytes at a time (identities are hashed on every decision), then a strong finaliser.
pub fn hash_str(s: &str) -> u64 {
    let bytes = s.as_bytes();
    let mut h: u64 =
        0xcbf2_9ce4_8422_2325 ^ (bytes.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("chunks of 8"));
        h = (h ^ w).wrapping_mul(0xff51_afd7_ed55_8ccd).rotate_left(31);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    fmix64(h)
}

/// MurmurHash3's 64-bit finaliser: a bijection with full avalanche.
#[inline]
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Rendezvous score of one (key, backend) pair: highest wins.
#[inline]
pub fn rendezvous(key: u64, node: u64) -> u64 {
    // Adding a golden-ratio multiple first keeps key == node from collapsing to fmix64(0).
    fmix64(key ^ node.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Weighted rendezvous (Schindelhauer & Schomaker): score = w / -ln(u), u uniform in (0, 1).
/// Returned as the bits of a positive f64, which order like the floats themselves.
#[inline]
pub fn weighted_rendezvous(key: u64, node: u64, weight: f64) -> u64 {
    let u = ((rendezvous(key, node) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    (weight / -u.ln()).to_bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_deterministic() {
        // These values are part of the placement contract between router replicas and
        // versions: a change here reshuffles every key's home backend.
        assert_eq!(hash_str("buildkitd-0"), 18356752467860658757);
        assert_eq!(hash_str("buildkitd-0"), hash_str("buildkitd-0"));
        assert_ne!(hash_str("buildkitd-0"), hash_str("buildkitd-1"));
        assert_eq!(fmix64(0), 0);
        assert_ne!(rendezvous(7, 7), 0);
    }

    #[test]
    fn weighted_scores_order_like_floats() {
        let a = weighted_rendezvous(1, 2, 1.0);
        let b = weighted_rendezvous(1, 2, 2.0);
        assert!(b > a, "doubling the weight raises the score");
    }
}
