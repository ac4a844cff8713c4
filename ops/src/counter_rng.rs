//! Counter-based random numbers: each value a pure function of its coordinates (SplitMix64's
//! finalizer, Steele, Lea & Flood 2014), so that values computed in any order, on any number of
//! threads or ranks, and after a resume are the same.

/// SplitMix64: one step's output for state `z`.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stream's key from its coordinates (seed, tensor, step...), mixed one after the other.
pub fn stream(coordinates: &[u64]) -> u64 {
    coordinates
        .iter()
        .fold(0x5851_F42D_4C95_7F2D, |k, &c| splitmix64(k ^ c))
}

/// 64 random bits for element `i` of stream `key`.
pub fn bits(key: u64, i: u64) -> u64 {
    splitmix64(key.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

/// A standard normal for element `i` of stream `key` (Box–Muller on two 32-bit uniforms of one
/// draw, the uniforms in (0, 1]).
pub fn normal(key: u64, i: u64) -> f32 {
    let b = bits(key, i);
    let u1 = ((b >> 32) as f64 + 1.0) / 4_294_967_296.0;
    let u2 = (b & 0xFFFF_FFFF) as f64 / 4_294_967_296.0;
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normals_have_unit_variance_and_depend_on_position_only() {
        let key = stream(&[1, 2]);
        let n = 200_000u64;
        let xs: Vec<f64> = (0..n).map(|i| normal(key, i) as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "mean {mean}, var {var}"
        );
        assert_eq!(normal(key, 17), normal(key, 17));
        assert_ne!(stream(&[1, 2]), stream(&[2, 1]));
    }
}
