//! Optimizer moments kept in 32 bits or quantised to 8 bits per entry, block-wise (in the spirit
//! of Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): each block of 256
//! entries stores one fp32 scale (its largest magnitude) and one byte per entry. The byte is a
//! logarithmic code of the entry's magnitude relative to the block's scale, so that small
//! entries keep their relative precision (as bitsandbytes' dynamic map does):
//!
//! ```text
//! signed (first moment):    code = sign(x) * (127 + round(K * log2(|x| / scale))),  K = 126 / 16
//! unsigned (second moment): code =            255 + round(K * log2(x / scale)),     K = 254 / 32
//! ```
//!
//! Code 0 is exactly zero; magnitudes below 2^-16 (signed) or 2^-32 (unsigned, a squared
//! quantity) of the block's scale flush to zero. The relative error of every other entry is at
//! most 2^(1 / 2K) - 1: 4.5% for either map (about 2.2% on sqrt(v), Adam's denominator). The
//! optimizer dequantises a moment to fp32, updates it, and quantises it back (`load`/`store`).

use crate::models::params::bytes_of;
use tch::{Device, Kind, Tensor};

/// Entries per block (one fp32 scale each).
pub const BLOCK: i64 = 256;

/// How a moment is stored.
pub enum Moment {
    Full(Tensor),
    Int8(Quantized),
}

/// A block-wise quantised tensor.
pub struct Quantized {
    /// `[blocks * BLOCK]`: int8 (signed map) or uint8 (unsigned map); the tail past `numel` is 0.
    pub codes: Tensor,
    /// `[blocks]`: the largest magnitude of each block (fp32).
    pub scale: Tensor,
    pub shape: Vec<i64>,
    pub signed: bool,
    /// `[256]`: the value of each code at scale 1 (see `table`), on the codes' device.
    table: Tensor,
}

/// (levels besides zero, log2 range) of each map.
fn map(signed: bool) -> (f64, f64) {
    if signed {
        (127.0, 16.0)
    } else {
        (255.0, 32.0)
    }
}

/// The largest relative error of a dequantised entry above the flush-to-zero threshold.
pub fn relative_error_bound(signed: bool) -> f64 {
    let (levels, range) = map(signed);
    let k = (levels - 1.0) / range;
    2f64.powf(0.5 / k) - 1.0
}

/// The fp32 value of each code at a block scale of 1, indexed by code (+ 128 for the signed
/// map): 0 for code 0, else sign * 2^((|code| - levels) / K).
fn table(signed: bool, device: Device) -> Tensor {
    let (levels, range) = map(signed);
    let k = (levels - 1.0) / range;
    let code = if signed {
        Tensor::arange_start(-128, 128, (Kind::Float, device))
    } else {
        Tensor::arange(256, (Kind::Float, device))
    };
    let mag = code.abs();
    let r = ((&mag - levels) / k).exp2().masked_fill(&mag.eq(0.0), 0.0);
    if signed {
        r * code.sign()
    } else {
        r
    }
}

impl Quantized {
    pub fn zeros(shape: &[i64], device: Device, signed: bool) -> Quantized {
        let numel: i64 = shape.iter().product();
        let blocks = (numel + BLOCK - 1) / BLOCK;
        let kind = if signed { Kind::Int8 } else { Kind::Uint8 };
        Quantized {
            codes: Tensor::zeros([blocks * BLOCK], (kind, device)),
            scale: Tensor::zeros([blocks], (Kind::Float, device)),
            shape: shape.to_vec(),
            signed,
            table: table(signed, device),
        }
    }

    fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// Quantises `x` (any float kind, this shape) into these codes and scales, in place.
    /// Few passes over the data, in place where possible (this runs for every moment at every
    /// step): level = round(K log2(|x| / scale)) is at most 0, and code = level + levels clamped
    /// to [0, levels] is 0 exactly for the levels below the smallest one (and for x = 0, whose
    /// log is -inf).
    pub fn store(&mut self, x: &Tensor) {
        let (levels, range) = map(self.signed);
        let k = (levels - 1.0) / range;
        let n = self.numel();
        let blocks = self.scale.size()[0];
        let flat = x.detach().to_kind(Kind::Float).reshape([-1]);
        // A partial last block is padded with zeros (a copy); whole blocks are viewed as they are.
        let pad = blocks * BLOCK - n;
        let padded = if pad == 0 {
            flat
        } else {
            flat.constant_pad_nd([0, pad])
        }
        .view([blocks, BLOCK]);
        let mut code = padded.abs();
        let scale = code.amax([1], false); // [blocks]
                                           // An all-zero block divides 0 by a tiny scale: codes 0.
        let _ = code.g_div_(&scale.clamp_min(1e-37).unsqueeze(1));
        let _ = code.log2_();
        let _ = code.g_mul_scalar_(k);
        let _ = code.round_();
        let _ = code.g_add_scalar_(levels);
        let _ = code.clamp_(0.0, levels);
        if self.signed {
            let _ = code.g_mul_(&padded.sign());
        }
        self.codes.copy_(&code.view([-1]));
        self.scale.copy_(&scale);
    }

    /// The fp32 tensor the codes stand for: a table lookup per entry, times its block's scale.
    pub fn load(&self) -> Tensor {
        let blocks = self.scale.size()[0];
        let mut index = self.codes.to_kind(Kind::Int64);
        if self.signed {
            let _ = index.g_add_scalar_(128);
        }
        let mut r = self.table.take(&index).view([blocks, BLOCK]);
        let _ = r.g_mul_(&self.scale.unsqueeze(1));
        r.view([-1])
            .narrow(0, 0, self.numel())
            .view(self.shape.as_slice())
    }

    pub fn bytes(&self) -> i64 {
        bytes_of(&self.codes) + bytes_of(&self.scale)
    }
}

impl Moment {
    /// A zero moment of `shape`: fp32-or-`kind` when `int8` is false, else quantised (`signed`
    /// for the first moment).
    pub fn zeros(shape: &[i64], kind: Kind, device: Device, int8: bool, signed: bool) -> Moment {
        if int8 {
            Moment::Int8(Quantized::zeros(shape, device, signed))
        } else {
            Moment::Full(Tensor::zeros(shape, (kind, device)))
        }
    }

    /// The moment as a tensor: the state itself for `Full` (in-place updates are kept), a
    /// dequantised copy for `Int8` (call `store` after updating it).
    pub fn load(&self) -> Tensor {
        match self {
            Moment::Full(t) => t.shallow_clone(),
            Moment::Int8(q) => q.load(),
        }
    }

    /// Keeps `x` as the new moment (a no-op for `Full`, whose `load` was updated in place).
    pub fn store(&mut self, x: &Tensor) {
        if let Moment::Int8(q) = self {
            q.store(x);
        }
    }

    pub fn bytes(&self) -> i64 {
        match self {
            Moment::Full(t) => bytes_of(t),
            Moment::Int8(q) => q.bytes(),
        }
    }

    /// The tensors saved in checkpoints: `slot.name`, and for 8-bit also `slot_scale.name`.
    pub fn named(&self, slot: &str, name: &str) -> Vec<(String, Tensor)> {
        match self {
            Moment::Full(t) => vec![(format!("{slot}.{name}"), t.shallow_clone())],
            Moment::Int8(q) => vec![
                (format!("{slot}.{name}"), q.codes.shallow_clone()),
                (format!("{slot}_scale.{name}"), q.scale.shallow_clone()),
            ],
        }
    }

    /// ReLoRA's reset: keeps the `keep_fraction` largest entries by magnitude, zeroes the rest.
    pub fn prune(&mut self, keep_fraction: f64) -> crate::Result<()> {
        let x = self.load();
        super::prune_by_magnitude(&x, keep_fraction)?;
        self.store(&x);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_bound(x: &Tensor, signed: bool) {
        let mut q = Quantized::zeros(&x.size(), Device::Cpu, signed);
        q.store(x);
        let y = q.load();
        let bound = relative_error_bound(signed);
        let (_, range) = map(signed);
        let xs = Vec::<f32>::try_from(x.flatten(0, -1)).unwrap();
        let ys = Vec::<f32>::try_from(y.flatten(0, -1)).unwrap();
        let n = xs.len();
        for b in 0..(n + BLOCK as usize - 1) / BLOCK as usize {
            let block = b * BLOCK as usize..((b + 1) * BLOCK as usize).min(n);
            let scale = xs[block.clone()].iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let floor = scale * 2f64.powf(-range);
            for i in block {
                let (a, d) = (xs[i] as f64, ys[i] as f64);
                if a.abs() >= floor * 2f64.powf(0.5) {
                    assert!(
                        (d - a).abs() <= bound * a.abs() * (1.0 + 1e-5) + 1e-30,
                        "entry {i}: {a} -> {d} (bound {bound})"
                    );
                    assert_eq!(a.signum(), d.signum());
                } else {
                    // Flushed to zero or kept within the bound of the threshold.
                    assert!(d.abs() <= floor * 2.0, "entry {i}: {a} -> {d}");
                }
            }
        }
    }

    #[test]
    fn quantise_dequantise_error_is_within_the_bound() {
        tch::manual_seed(0);
        // Values over many orders of magnitude, blocks of different scales, a partial block.
        let base = Tensor::randn([3, 1000], (Kind::Float, Device::Cpu));
        let scales =
            Tensor::logspace(-8.0, 2.0, 3000, 10.0, (Kind::Float, Device::Cpu)).view([3, 1000]);
        let x = base * scales;
        check_bound(&x, true);
        check_bound(&(&x * &x), false);
        assert!(relative_error_bound(true) < 0.046 && relative_error_bound(false) < 0.046);
    }

    #[test]
    fn zeros_stay_zero_and_memory_is_a_quarter() {
        let x = Tensor::zeros([10, 30], (Kind::Float, Device::Cpu));
        let mut q = Quantized::zeros(&[10, 30], Device::Cpu, true);
        q.store(&x);
        assert_eq!(q.load().abs().sum(Kind::Double).double_value(&[]), 0.0);
        let big = Moment::zeros(&[4096, 64], Kind::Float, Device::Cpu, true, false);
        let full = Moment::zeros(&[4096, 64], Kind::Float, Device::Cpu, false, false);
        let ratio = big.bytes() as f64 / full.bytes() as f64;
        assert!((ratio - (0.25 + 1.0 / 256.0)).abs() < 1e-9, "{ratio}");
    }
}
