//! The output projection and cross-entropy of a language model in chunks of positions, as one
//! autograd function of the shim (`csrc/linear_cross_entropy.cpp`).

use std::ffi::CStr;
use std::os::raw::{c_char, c_void};
use tch::Tensor;

extern "C" {
    fn te_linear_cross_entropy(
        hidden: *const c_void,
        weight: *const c_void,
        targets: *const c_void,
        logit_scale: f64,
        chunk_rows: i64,
        ignore_index: i64,
    ) -> *mut c_void;
    fn te_linear_cross_entropy_error() -> *const c_char;
}

/// The mean cross-entropy of the logits `hidden [n, d] @ weight [V, d]^T / logit_scale` against
/// `targets [n]` (rows whose target is `ignore_index` left out), computed `chunk_rows` rows at a
/// time so that the `[n, V]` logits never exist whole: an autograd function
/// (`csrc/linear_cross_entropy.cpp`) that forms the gradients of `hidden` and `weight` chunk by
/// chunk during the forward pass (when grad mode is on and they require it) and scales them in
/// backward. Under autocast the matmuls run in its dtype, the softmax in fp32, as the composite
/// `linear` + `cross_entropy` do.
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    logit_scale: f64,
    chunk_rows: i64,
    ignore_index: i64,
) -> Result<Tensor, String> {
    if chunk_rows < 1 {
        return Err(format!("linear_cross_entropy: chunk_rows {chunk_rows} < 1"));
    }
    // SAFETY: the three handles are live tensors for the duration of the call; a non-null
    // result is a heap at::Tensor whose ownership passes to the returned Tensor.
    let ptr = unsafe {
        te_linear_cross_entropy(
            hidden.as_ptr() as *const c_void,
            weight.as_ptr() as *const c_void,
            targets.as_ptr() as *const c_void,
            logit_scale,
            chunk_rows,
            ignore_index,
        )
    };
    if ptr.is_null() {
        // SAFETY: a thread-local NUL-terminated string, copied out at once.
        let msg = unsafe { CStr::from_ptr(te_linear_cross_entropy_error()) };
        return Err(msg.to_string_lossy().into_owned());
    }
    // SAFETY: see above.
    Ok(unsafe { Tensor::from_ptr(ptr as *mut torch_sys::C_tensor) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The composite: the whole logits, then cross_entropy's mean over kept rows.
    fn composite(h: &Tensor, w: &Tensor, t: &Tensor, scale: f64) -> Tensor {
        (h.linear(w, None::<&Tensor>) / scale)
            .to_kind(Kind::Float)
            .cross_entropy_loss::<Tensor>(t, None, tch::Reduction::Mean, -100, 0.0)
    }

    fn inputs(kind: Kind) -> (Tensor, Tensor, Tensor) {
        tch::manual_seed(3);
        let opts = (kind, Device::Cpu);
        let h = Tensor::randn([37, 16], opts).set_requires_grad(true);
        let w = (Tensor::randn([50, 16], opts) * 0.3).set_requires_grad(true);
        let t = Tensor::randint(50, [37], (Kind::Int64, Device::Cpu));
        // Some rows left out, as masked prompts are.
        let _ = t.narrow(0, 5, 4).fill_(-100);
        (h, w, t)
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_kind(Kind::Double);
        let b = b.to_kind(Kind::Double);
        let scale = b.abs().max().double_value(&[]).max(1e-12);
        (a - b).abs().max().double_value(&[]) / scale
    }

    #[test]
    fn loss_and_gradients_equal_the_composite_at_every_chunk_size() {
        for scale in [1.0, 2.5] {
            let (h, w, t) = inputs(Kind::Float);
            let reference = composite(&h, &w, &t, scale);
            reference.backward();
            let (gh, gw) = (h.grad().copy(), w.grad().copy());
            for chunk in [1, 7, 37, 1000] {
                let _ = h.grad().zero_();
                let _ = w.grad().zero_();
                let loss = linear_cross_entropy(&h, &w, &t, scale, chunk, -100).expect("lce");
                assert!(max_rel_diff(&loss, &reference) < 1e-6, "chunk {chunk}");
                // The incoming gradient scales both (accumulated micro-batches divide it).
                (&loss * 3.0).backward();
                assert!(
                    max_rel_diff(&h.grad(), &(&gh * 3.0)) < 1e-5,
                    "chunk {chunk}"
                );
                assert!(
                    max_rel_diff(&w.grad(), &(&gw * 3.0)) < 1e-5,
                    "chunk {chunk}"
                );
            }
        }
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient_and_no_grad_mode_only_the_loss() {
        let (h, w, t) = inputs(Kind::Float);
        let w = w.detach();
        let loss = linear_cross_entropy(&h, &w, &t, 1.0, 8, -100).expect("lce");
        loss.backward();
        assert!(h.grad().defined() && !w.grad().defined());
        let reference = composite(&h, &w, &t, 1.0);
        let plain = tch::no_grad(|| linear_cross_entropy(&h, &w, &t, 1.0, 8, -100)).expect("lce");
        assert!(!plain.requires_grad());
        assert!(max_rel_diff(&plain, &reference) < 1e-6);
    }

    #[test]
    fn bf16_weights_stay_within_bf16_rounding_of_the_composite() {
        let (h, w, t) = inputs(Kind::BFloat16);
        let reference = composite(&h, &w, &t, 1.0);
        reference.backward();
        let (gh, gw) = (h.grad().copy(), w.grad().copy());
        let _ = h.grad().zero_();
        let _ = w.grad().zero_();
        let loss = linear_cross_entropy(&h, &w, &t, 1.0, 5, -100).expect("lce");
        loss.backward();
        assert!(max_rel_diff(&loss, &reference) < 1e-2);
        assert!(max_rel_diff(&h.grad(), &gh) < 2e-2);
        assert!(max_rel_diff(&w.grad(), &gw) < 2e-2);
        assert_eq!(w.grad().kind(), Kind::BFloat16);
    }

    #[test]
    fn under_autocast_fp32_weights_get_fp32_gradients_within_bf16_rounding() {
        let (h, w, t) = inputs(Kind::Float);
        let reference =
            crate::with_autocast_bf16(false, || composite(&h, &w, &t, 1.0)).expect("autocast");
        reference.backward();
        let (gh, gw) = (h.grad().copy(), w.grad().copy());
        let _ = h.grad().zero_();
        let _ = w.grad().zero_();
        let loss =
            crate::with_autocast_bf16(false, || linear_cross_entropy(&h, &w, &t, 1.0, 37, -100))
                .expect("autocast")
                .expect("lce");
        assert!(
            max_rel_diff(&loss, &reference) < 1e-6,
            "one chunk: the same ops"
        );
        loss.backward();
        assert_eq!(
            (h.grad().kind(), w.grad().kind()),
            (Kind::Float, Kind::Float)
        );
        assert!(max_rel_diff(&h.grad(), &gh) < 1e-2);
        assert!(max_rel_diff(&w.grad(), &gw) < 1e-2);
    }

    #[test]
    fn no_kept_target_is_nan_as_cross_entropy_gives_and_a_bad_chunk_is_an_error() {
        let (h, w, _) = inputs(Kind::Float);
        let t = Tensor::full([37], -100, (Kind::Int64, Device::Cpu));
        let loss = linear_cross_entropy(&h, &w, &t, 1.0, 8, -100).expect("lce");
        assert!(loss.double_value(&[]).is_nan());
        assert!(composite(&h, &w, &t, 1.0).double_value(&[]).is_nan());
        assert!(linear_cross_entropy(&h, &w, &t, 1.0, 0, -100).is_err());
        // A shape mismatch is libtorch's message, not a crash.
        let wrong = Tensor::zeros([50, 15], (Kind::Float, Device::Cpu));
        let e = linear_cross_entropy(&h, &wrong, &t, 1.0, 8, -100).expect_err("error");
        assert!(!e.is_empty());
    }
}
