//! Activation recomputation as one autograd function of the shim (`csrc/recompute.cpp`,
//! torch.utils.checkpoint's reentrant variant): `recompute(x, f)` is `f(x)` whose inner
//! activations are not kept; the backward pass runs `f` again, with a graph, under the autocast
//! state of the forward pass, and backpropagates through it. `recompute_many` takes several
//! inputs.
//!
//! `with_backward_prelude(x, f, prelude)` is the other way round: `f(x)` keeps its graph as usual,
//! and when the backward pass reaches it, `prelude` runs first (sharded weights that the forward
//! pass let go of are gathered again into the storage the graph saved).

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use tch::Tensor;

type Call = unsafe extern "C" fn(*mut c_void, *const *const c_void, c_int) -> *mut c_void;
type Drop = unsafe extern "C" fn(*mut c_void);
type Prelude = unsafe extern "C" fn(*mut c_void) -> c_int;

extern "C" {
    fn te_recompute(
        xs: *const *const c_void,
        n: c_int,
        call: Call,
        ctx: *mut c_void,
        drop: Drop,
    ) -> *mut c_void;
    fn te_with_prelude(
        xs: *const *const c_void,
        n: c_int,
        call: Call,
        ctx: *mut c_void,
        drop: Drop,
        before: Prelude,
    ) -> *mut c_void;
    fn te_recompute_error() -> *const c_char;
    fn te_grad_mode_enabled() -> c_int;
}

type BoxedFn = Box<dyn Fn(&[Tensor]) -> Tensor>;

/// What the shim calls back behind its `ctx`: the function (and for `with_backward_prelude`, the
/// prelude).
trait Context {
    fn function(&self) -> &BoxedFn;
}

impl Context for BoxedFn {
    fn function(&self) -> &BoxedFn {
        self
    }
}

struct WithPrelude {
    f: BoxedFn,
    prelude: Box<dyn Fn()>,
}

impl Context for WithPrelude {
    fn function(&self) -> &BoxedFn {
        &self.f
    }
}

/// Calls the closure behind `ctx` on the `n` at::Tensors of `inputs` and returns its result as a
/// heap at::Tensor for the shim to take. A panic is caught here (it must not unwind into C++):
/// null.
unsafe extern "C" fn call<C: Context>(
    ctx: *mut c_void,
    inputs: *const *const c_void,
    n: c_int,
) -> *mut c_void {
    // SAFETY: `ctx` is the live Box<C> of `recompute_many` or `with_backward_prelude` (freed
    // only by `drop_ctx`), and `inputs` n live at::Tensors of the shim; we take handles of our
    // own on them.
    let (f, xs) = unsafe {
        let xs: Vec<Tensor> = (0..n as usize)
            .map(|i| {
                Tensor::from_ptr(torch_sys::at_shallow_clone(
                    *inputs.add(i) as *mut torch_sys::C_tensor
                ))
            })
            .collect();
        ((*(ctx as *const C)).function(), xs)
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&xs))) {
        Ok(mut y) => {
            let ptr = y.as_mut_ptr();
            std::mem::forget(y); // the shim owns (and deletes) the heap at::Tensor now
            ptr as *mut c_void
        }
        Err(_) => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn drop_ctx<C>(ctx: *mut c_void) {
    // SAFETY: `ctx` came from Box::into_raw of a Box<C> and is freed once.
    drop(unsafe { Box::from_raw(ctx as *mut C) });
}

/// Runs the prelude behind `ctx`; a panic is caught here (it must not unwind into C++): 1.
unsafe extern "C" fn run_prelude(ctx: *mut c_void) -> c_int {
    // SAFETY: `ctx` is the live Box<WithPrelude> of `with_backward_prelude`.
    let ctx = unsafe { &*(ctx as *const WithPrelude) };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (ctx.prelude)())) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// `f(x)`, recomputed in the backward pass instead of keeping its activations; `f` may use
/// parameters of its own (a transformer block), which get their gradients even when `x` needs
/// none. Without grad mode, `f(x)` plainly. `f` must give the same result when run again: no
/// dropout or other random draws, no side effects. It is kept until the backward pass has run
/// (the tensors it captured with it).
pub fn recompute(x: &Tensor, f: impl Fn(&Tensor) -> Tensor + 'static) -> Result<Tensor, String> {
    recompute_inner(&[x], move |xs: &[Tensor]| f(&xs[0]), true)
}

/// Whether libtorch's grad mode is on in this thread (off inside a recomputed function's first
/// run, on when the backward pass runs it again).
pub fn grad_mode_enabled() -> bool {
    // SAFETY: a plain query of libtorch's thread-local grad mode.
    unsafe { te_grad_mode_enabled() != 0 }
}

/// `recompute` of a function of several tensors and nothing else (no parameters of its own:
/// attention's core, a gated activation); the gradients of those that require one. When none
/// does, `f` plainly (it has nothing to keep a graph for).
pub fn recompute_many(
    xs: &[&Tensor],
    f: impl Fn(&[Tensor]) -> Tensor + 'static,
) -> Result<Tensor, String> {
    recompute_inner(xs, f, false)
}

/// `recompute_many`, or with `has_params` for a function with parameters of its own
/// (`recorded_inputs`).
fn recompute_inner(
    xs: &[&Tensor],
    f: impl Fn(&[Tensor]) -> Tensor + 'static,
    has_params: bool,
) -> Result<Tensor, String> {
    let needed = has_params || xs.iter().any(|x| x.requires_grad());
    if !grad_mode_enabled() || !needed {
        let owned: Vec<Tensor> = xs.iter().map(|x| x.shallow_clone()).collect();
        return Ok(f(&owned));
    }
    let leaves = recorded_inputs(xs);
    let boxed: Box<BoxedFn> = Box::new(Box::new(f));
    let ctx = Box::into_raw(boxed) as *mut c_void;
    let handles: Vec<*const c_void> = leaves.iter().map(|x| x.as_ptr() as *const c_void).collect();
    // SAFETY: `ctx` is a leaked Box<BoxedFn> that `drop_ctx` frees once; `call` reads it; the
    // handles are live tensors for the duration of the call.
    let ptr = unsafe {
        te_recompute(
            handles.as_ptr(),
            handles.len() as c_int,
            call::<BoxedFn>,
            ctx,
            drop_ctx::<BoxedFn>,
        )
    };
    // SAFETY: on failure the shim did not keep `ctx`, a Box<BoxedFn>.
    unsafe { taken(ptr, ctx, drop_ctx::<BoxedFn>) }
}

/// `f(x)` with its graph kept as usual; when the backward pass reaches it, `prelude` runs
/// first, then the gradients flow through the kept graph. Without grad mode, `f(x)` plainly
/// (and `prelude` never runs). A panic in `prelude` fails the backward pass with an error.
pub fn with_backward_prelude(
    x: &Tensor,
    f: impl Fn(&Tensor) -> Tensor + 'static,
    prelude: impl Fn() + 'static,
) -> Result<Tensor, String> {
    if !grad_mode_enabled() {
        return Ok(f(x));
    }
    let leaves = recorded_inputs(&[x]);
    let boxed = Box::new(WithPrelude {
        f: Box::new(move |xs: &[Tensor]| f(&xs[0])),
        prelude: Box::new(prelude),
    });
    let ctx = Box::into_raw(boxed) as *mut c_void;
    let handles: Vec<*const c_void> = leaves.iter().map(|x| x.as_ptr() as *const c_void).collect();
    // SAFETY: `ctx` is a leaked Box<WithPrelude> that `drop_ctx` frees once; `call` and
    // `run_prelude` read it; the handles are live tensors for the duration of the call.
    let ptr = unsafe {
        te_with_prelude(
            handles.as_ptr(),
            handles.len() as c_int,
            call::<WithPrelude>,
            ctx,
            drop_ctx::<WithPrelude>,
            run_prelude,
        )
    };
    // SAFETY: on failure the shim did not keep `ctx`, a Box<WithPrelude>.
    unsafe { taken(ptr, ctx, drop_ctx::<WithPrelude>) }
}

/// The inputs as the shim's function gets them. Its function's parameters may need gradients
/// when no input does (trained blocks above a frozen embedding, LoRA adapters): autograd
/// records the function only for an input that requires a gradient, so the inputs are then
/// passed as leaves that do (the same memory; their gradients are formed and dropped). Run
/// plainly instead, the function would keep its activations and the tensors it uses past the
/// call.
fn recorded_inputs(xs: &[&Tensor]) -> Vec<Tensor> {
    let any = xs.iter().any(|x| x.requires_grad());
    xs.iter()
        .map(|x| match any {
            true => x.shallow_clone(),
            false => x.detach().set_requires_grad(true),
        })
        .collect()
}

/// The shim's result: the output tensor, or its error (with `ctx` freed by `drop`).
///
/// # Safety
/// `ptr` is what the shim returned for `ctx`, which `drop` frees.
unsafe fn taken(ptr: *mut c_void, ctx: *mut c_void, drop: Drop) -> Result<Tensor, String> {
    if ptr.is_null() {
        // SAFETY: on failure the shim did not keep `ctx`.
        unsafe { drop(ctx) };
        let msg = unsafe { CStr::from_ptr(te_recompute_error()) };
        return Err(msg.to_string_lossy().into_owned());
    }
    // SAFETY: a heap at::Tensor whose ownership passes to the returned Tensor.
    Ok(unsafe { Tensor::from_ptr(ptr as *mut torch_sys::C_tensor) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// A two-layer MLP block whose parameters are leaves: gradients through `recompute` equal
    /// those of the plain graph bitwise, for the input and for the parameters.
    #[test]
    fn gradients_equal_the_plain_graph_bitwise() {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        let w1 = Tensor::randn([8, 6], opts).set_requires_grad(true);
        let w2 = Tensor::randn([6, 8], opts).set_requires_grad(true);
        let x0 = Tensor::randn([5, 6], opts).set_requires_grad(true);
        let block = || {
            let (w1, w2) = (w1.shallow_clone(), w2.shallow_clone());
            move |x: &Tensor| {
                x + x
                    .linear(&w1, None::<&Tensor>)
                    .gelu("none")
                    .linear(&w2, None::<&Tensor>)
            }
        };
        let plain = block()(&block()(&(&x0 * 2.0))).square().sum(Kind::Float);
        plain.backward();
        let grads = [x0.grad().copy(), w1.grad().copy(), w2.grad().copy()];
        for t in [&x0, &w1, &w2] {
            let _ = t.grad().zero_();
        }
        let h = recompute(&(&x0 * 2.0), block()).expect("first");
        let y = recompute(&h, block()).expect("second");
        let again = y.square().sum(Kind::Float);
        assert_eq!(again.double_value(&[]), plain.double_value(&[]));
        again.backward();
        for (t, g) in [&x0, &w1, &w2].into_iter().zip(&grads) {
            assert!(t.grad().equal(g), "{t:?}");
        }
    }

    /// Several inputs, one of them without a gradient: the others' gradients are those of the
    /// plain graph, bitwise.
    #[test]
    fn several_inputs_get_their_gradients() {
        tch::manual_seed(4);
        let opts = (Kind::Float, Device::Cpu);
        let (a, b) = (
            Tensor::randn([4, 5], opts).set_requires_grad(true),
            Tensor::randn([4, 5], opts).set_requires_grad(true),
        );
        let c = Tensor::randn([4, 5], opts); // no gradient
        let f = |xs: &[Tensor]| xs[0].silu() * &xs[1] + &xs[2];
        let plain = f(&[a.shallow_clone(), b.shallow_clone(), c.shallow_clone()])
            .square()
            .sum(Kind::Float);
        plain.backward();
        let (ga, gb) = (a.grad().copy(), b.grad().copy());
        let _ = a.grad().zero_();
        let _ = b.grad().zero_();
        let y = recompute_many(&[&a, &b, &c], f).expect("recompute");
        y.square().sum(Kind::Float).backward();
        assert!(a.grad().equal(&ga) && b.grad().equal(&gb));
        assert!(!c.grad().defined());
    }

    /// An input that needs no gradient (a frozen embedding's output) into a function whose
    /// parameter does: the function is recomputed in the backward pass (it runs twice), and the
    /// parameter's gradient is that of the plain graph, bitwise.
    #[test]
    fn parameters_get_gradients_when_the_input_needs_none() {
        tch::manual_seed(5);
        let opts = (Kind::Float, Device::Cpu);
        let w = Tensor::randn([6, 6], opts).set_requires_grad(true);
        let x = Tensor::randn([3, 6], opts); // no gradient
        let runs = std::rc::Rc::new(std::cell::Cell::new(0));
        let f = || {
            let (w, runs) = (w.shallow_clone(), runs.clone());
            move |x: &Tensor| {
                runs.set(runs.get() + 1);
                x.linear(&w, None::<&Tensor>).tanh()
            }
        };
        let plain = f()(&x).square().sum(Kind::Float);
        plain.backward();
        let gw = w.grad().copy();
        let _ = w.grad().zero_();
        runs.set(0);
        let y = recompute(&x, f()).expect("recompute");
        assert!(y.requires_grad());
        y.square().sum(Kind::Float).backward();
        assert_eq!(runs.get(), 2, "run again in the backward pass");
        assert!(w.grad().equal(&gw));
        assert!(!x.grad().defined());
    }

    /// A block whose weight is let go of after the forward pass (no memory) and refilled by the
    /// prelude into the same storage, through `data()` (no version bump: the graph saved the
    /// weight): the prelude runs once, in the backward pass, and the gradients are those of the
    /// plain graph, bitwise; its input, needing no gradient, gets none.
    #[test]
    fn the_prelude_refills_released_weights_before_the_gradients_flow() {
        tch::manual_seed(6);
        let opts = (Kind::Float, Device::Cpu);
        let w = Tensor::randn([6, 6], opts).set_requires_grad(true);
        let values = w.detach().copy();
        let x = Tensor::randn([3, 6], opts);
        let block = |w: &Tensor| {
            let w = w.shallow_clone();
            move |x: &Tensor| {
                x.linear(&w, None::<&Tensor>)
                    .tanh()
                    .linear(&w, None::<&Tensor>)
            }
        };
        let plain = block(&w)(&x).square().sum(Kind::Float);
        plain.backward();
        let gw = w.grad().copy();
        let _ = w.grad().zero_();
        let preludes = std::rc::Rc::new(std::cell::Cell::new(0));
        let (w_in, count) = (w.shallow_clone(), preludes.clone());
        let f = move |x: &Tensor| {
            let y = block(&w_in)(x);
            crate::release_storage(&w_in).expect("release");
            y
        };
        let (w_again, values_again) = (w.shallow_clone(), values.shallow_clone());
        let prelude = move || {
            count.set(count.get() + 1);
            crate::materialize_storage(&w_again).expect("materialize");
            tch::no_grad(|| w_again.data().copy_(&values_again));
        };
        let y = with_backward_prelude(&x, f, prelude).expect("forward");
        assert_eq!(
            crate::storage_bytes(&w),
            0,
            "let go of after the forward pass"
        );
        assert_eq!(preludes.get(), 0);
        let again = y.square().sum(Kind::Float);
        assert_eq!(again.double_value(&[]), plain.double_value(&[]));
        again.backward();
        assert_eq!(preludes.get(), 1);
        assert!(w.grad().equal(&gw));
        assert!(!x.grad().defined());
    }

    #[test]
    fn a_panicking_prelude_fails_the_backward_pass() {
        let w = Tensor::ones([2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::ones([1, 2], (Kind::Float, Device::Cpu));
        let f = move |x: &Tensor| x.linear(&w, None::<&Tensor>);
        let y = with_backward_prelude(&x, f, || panic!("boom")).expect("forward");
        let e = y
            .sum(Kind::Float)
            .f_backward()
            .expect_err("the prelude failed");
        assert!(e.to_string().contains("prelude"), "{e}");
    }

    /// A function of its inputs only, none of which needs a gradient: nothing to recompute for,
    /// it runs plainly (no graph).
    #[test]
    fn a_parameterless_function_of_inputs_without_gradients_runs_plainly() {
        let (a, b) = (
            Tensor::ones([3], (Kind::Float, Device::Cpu)),
            Tensor::ones([3], (Kind::Float, Device::Cpu)),
        );
        let y = recompute_many(&[&a, &b], |xs: &[Tensor]| &xs[0] * &xs[1]).expect("plain");
        assert!(!y.requires_grad());
    }

    #[test]
    fn without_grad_mode_it_is_the_function_itself() {
        let x = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let y = tch::no_grad(|| recompute(&x, |x| x * 3.0)).expect("plain");
        assert!(!y.requires_grad());
        assert_eq!(y.double_value(&[0]), 3.0);
        let y = tch::no_grad(|| with_backward_prelude(&x, |x| x * 3.0, || panic!("never")));
        assert_eq!(y.expect("plain").double_value(&[0]), 3.0);
    }

    #[test]
    fn a_panicking_function_is_an_error_not_an_abort() {
        let x = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let e = recompute(&x, |_| panic!("boom")).expect_err("error");
        assert!(e.contains("panicked"), "{e}");
    }

    /// The recomputation runs under the forward pass's autocast state although the backward
    /// pass runs outside it: the gradient is that of the bf16 computation.
    #[test]
    fn the_forward_autocast_state_is_restored_for_the_recomputation() {
        tch::manual_seed(2);
        let opts = (Kind::Float, Device::Cpu);
        let w = Tensor::randn([16, 16], opts).set_requires_grad(true);
        let x = Tensor::randn([4, 16], opts).set_requires_grad(true);
        let f = || {
            let w = w.shallow_clone();
            move |x: &Tensor| x.linear(&w, None::<&Tensor>).to_kind(Kind::Float)
        };
        let plain =
            crate::with_autocast_bf16(false, || f()(&x).sum(Kind::Float)).expect("autocast");
        plain.backward();
        let gw = w.grad().copy();
        let _ = w.grad().zero_();
        let again = crate::with_autocast_bf16(false, || {
            recompute(&x, f()).expect("recompute").sum(Kind::Float)
        })
        .expect("autocast");
        again.backward(); // outside the autocast region
        assert!(w.grad().equal(&gw));
    }
}
