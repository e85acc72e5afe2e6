//! Gradient-ready hooks: a callback as soon as autograd has accumulated a parameter's gradient
//! during a backward pass (torch's `register_post_accumulate_grad_hook`), for layer-wise
//! optimizer updates (GaLore's "per-layer weight updates"): each parameter is updated and its
//! gradient dropped while the backward pass goes on, so that the gradients of the whole model
//! are never held at once.
//!
//! The hooks live on the parameters from [`GradReadyHooks::install`] until the value is dropped,
//! but they only act inside [`GradReadyHooks::backward`], which lends them the callback for the
//! duration of one backward pass; outside it (a gradient-accumulation micro-batch, say) a ready
//! gradient is left alone. Each set of hooks has its own id, so that several sets (threads of a
//! test binary) do not meet; one set runs one backward pass at a time.

use std::os::raw::{c_int, c_void};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Mutex, PoisonError};
use tch::Tensor;

extern "C" {
    fn te_set_grad_ready_hook(
        t: *mut c_void,
        callback: Option<extern "C" fn(i64)>,
        index: i64,
    ) -> c_int;
}

/// The callback lent to the hooks during one backward pass, as a raw pointer: autograd may call
/// the hooks from its device thread (CUDA) while the lending thread waits in `backward`.
struct Lent(*mut (dyn FnMut(usize) + 'static));
// SAFETY: the pointer is only dereferenced while `GradReadyHooks::backward` holds the exclusive
// borrow it came from and waits for the backward pass, under the `ARMED` lock.
unsafe impl Send for Lent {}

struct Armed {
    callback: Lent,
    /// A panic of the callback, carried back to the lending thread.
    panic: Option<Box<dyn std::any::Any + Send>>,
}

/// The armed sets of hooks, by id.
static ARMED: Mutex<Vec<(u32, Armed)>> = Mutex::new(Vec::new());
static NEXT_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// The hook's argument: the set's id in the high 32 bits, the parameter's position in the low.
extern "C" fn on_grad_ready(tag: i64) {
    let (id, index) = ((tag >> 32) as u32, (tag & 0xffff_ffff) as usize);
    let mut armed = ARMED.lock().unwrap_or_else(PoisonError::into_inner);
    let Some((_, a)) = armed.iter_mut().find(|(i, _)| *i == id) else {
        return; // not inside `backward`: leave the gradient to accumulate
    };
    if a.panic.is_some() {
        return;
    }
    // SAFETY: see `Lent`.
    let f = unsafe { &mut *a.callback.0 };
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(index))) {
        a.panic = Some(p);
    }
}

/// Hooks on a list of parameters; the callback receives the parameter's position in the list.
pub struct GradReadyHooks {
    id: u32,
    params: Vec<Tensor>,
}

impl GradReadyHooks {
    /// Installs a hook on every tensor of `params` (leaf tensors that require grad).
    pub fn install(params: Vec<Tensor>) -> Result<GradReadyHooks, String> {
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut hooks = GradReadyHooks {
            id,
            params: Vec::new(),
        };
        for (i, p) in params.into_iter().enumerate() {
            let tag = (i64::from(id) << 32) | i as i64;
            // SAFETY: a live tensor handle for the duration of the call.
            let rc = unsafe {
                te_set_grad_ready_hook(p.as_ptr() as *mut c_void, Some(on_grad_ready), tag)
            };
            if rc != 0 {
                return Err(crate::last_error());
            }
            hooks.params.push(p);
        }
        Ok(hooks)
    }

    /// Runs `backward` (a backward pass) with `on_ready(i)` called as soon as the gradient of
    /// parameter `i` is complete. A panic in `on_ready` is raised again here after `backward`.
    pub fn backward<R>(&self, on_ready: &mut dyn FnMut(usize), backward: impl FnOnce() -> R) -> R {
        // SAFETY: the 'static lifetime is a lie confined to this call: the pointer is removed
        // from ARMED before this function returns (also when `backward` panics, by the guard).
        let ptr: *mut (dyn FnMut(usize) + '_) = on_ready;
        let ptr: *mut (dyn FnMut(usize) + 'static) = unsafe { std::mem::transmute(ptr) };
        let id = self.id;
        {
            let mut armed = ARMED.lock().unwrap_or_else(PoisonError::into_inner);
            assert!(
                armed.iter().all(|(i, _)| *i != id),
                "one backward pass at a time per set of gradient hooks"
            );
            let callback = Lent(ptr);
            armed.push((
                id,
                Armed {
                    callback,
                    panic: None,
                },
            ));
        }
        /// Removes this set from ARMED (also when `backward` panics); returns its callback's panic.
        struct Disarm(u32);
        impl Disarm {
            fn take(&self) -> Option<Box<dyn std::any::Any + Send>> {
                let mut armed = ARMED.lock().unwrap_or_else(PoisonError::into_inner);
                let pos = armed.iter().position(|(i, _)| *i == self.0)?;
                armed.swap_remove(pos).1.panic
            }
        }
        impl Drop for Disarm {
            fn drop(&mut self) {
                self.take();
            }
        }
        let guard = Disarm(id);
        let out = backward();
        let panic = guard.take();
        if let Some(p) = panic {
            resume_unwind(p);
        }
        out
    }
}

impl Drop for GradReadyHooks {
    fn drop(&mut self) {
        for p in &self.params {
            // SAFETY: a live tensor handle; a null callback removes the hook.
            unsafe { te_set_grad_ready_hook(p.as_ptr() as *mut c_void, None, 0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn the_callback_sees_each_complete_gradient_during_backward_only() {
        let a = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let b = Tensor::full([2], 2.0, (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let hooks = GradReadyHooks::install(vec![a.shallow_clone(), b.shallow_clone()]).unwrap();
        let loss = || (&a * 3.0).sum(Kind::Float) + (&b * &b).sum(Kind::Float);
        // Outside `backward`: nothing is called, the gradients accumulate as usual.
        loss().backward();
        // Inside: each parameter once, with its accumulated gradient (3 + 3, 4 + 4), and it may
        // drop the gradient.
        let mut seen = Vec::new();
        let params = [a.shallow_clone(), b.shallow_clone()];
        hooks.backward(
            &mut |i| {
                seen.push((i, Vec::<f32>::try_from(params[i].grad()).unwrap()));
                crate::grads_to_none(&[&params[i]]).unwrap();
            },
            || loss().backward(),
        );
        seen.sort_by_key(|(i, _)| *i);
        assert_eq!(seen, vec![(0, vec![6.0; 3]), (1, vec![8.0; 2])]);
        assert!(!a.grad().defined() && !b.grad().defined());
        // Removed with the value: no call any more.
        drop(hooks);
        let mut calls = 0;
        let other = GradReadyHooks::install(vec![]).unwrap();
        other.backward(&mut |_| calls += 1, || loss().backward());
        assert_eq!(calls, 0);
    }

    /// What layer-wise updates save: dropping each gradient in the callback means a deep chain
    /// never holds more than one layer's gradients at once, where a plain backward pass ends with
    /// all of them.
    #[test]
    fn dropping_in_the_callback_keeps_one_layer_of_gradients_alive() {
        tch::manual_seed(0);
        let layers: Vec<Tensor> = (0..6)
            .map(|_| Tensor::randn([8, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true))
            .collect();
        let forward = || {
            let mut x = Tensor::ones([4, 8], (Kind::Float, Device::Cpu));
            for w in &layers {
                x = x.matmul(w).tanh();
            }
            x.sum(Kind::Float)
        };
        let hooks =
            GradReadyHooks::install(layers.iter().map(|w| w.shallow_clone()).collect()).unwrap();
        let alive = || layers.iter().filter(|w| w.grad().defined()).count();
        let (mut most, mut order) = (0, Vec::new());
        hooks.backward(
            &mut |i| {
                most = most.max(alive());
                order.push(i);
                crate::grads_to_none(&[&layers[i]]).unwrap();
            },
            || forward().backward(),
        );
        assert_eq!(most, 1);
        assert_eq!(order, vec![5, 4, 3, 2, 1, 0], "last layer first");
        forward().backward();
        assert_eq!(alive(), 6);
    }

    #[test]
    fn a_panic_in_the_callback_reaches_the_caller() {
        let a = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let hooks = GradReadyHooks::install(vec![a.shallow_clone()]).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            hooks.backward(&mut |_| panic!("boom"), || a.sum(Kind::Float).backward())
        }));
        assert!(r.is_err());
        // Disarmed afterwards: a later plain backward is unaffected.
        a.sum(Kind::Float).backward();
    }
}
