//! An ordered store of named parameters, and the one rule by which name patterns select them.
//!
//! Models register each weight here under its Hugging Face key (`model.layers.0.mlp.up_proj.weight`)
//! and keep a shallow clone for their forward pass, so both see the same storage. The order of
//! registration is the order optimizers, checkpoints and gradient clipping walk: deterministic,
//! unlike a hash map.
//!
//! ## Name patterns
//!
//! Every list of name patterns in a recipe or on the command line (`peft.target`,
//! `optim.target` of GaLore, `optim.prunable` of GSM, `prune.prunable`, `trainer prune
//! --prunable`) follows one rule, PEFT's rule for `target_modules` given as a list:
//!
//! - a pattern matches a path when it matches the whole path, or a suffix of it that starts
//!   right after a `.` (so it matches whole components, never part of one);
//! - `*` matches any run of characters, dots included;
//! - a pattern matches a parameter when it matches the parameter's name
//!   (`model.layers.0.self_attn.q_proj.weight`) or its module path, the name without its last
//!   `.weight` or `.bias` (`model.layers.0.self_attn.q_proj`).
//!
//! | pattern            | selects                                                       |
//! |--------------------|---------------------------------------------------------------|
//! | `q_proj`           | every `...q_proj.weight` (and `.bias`), as PEFT's `q_proj`    |
//! | `self_attn.q_proj` | the same, spelled with its parent                             |
//! | `q_proj.weight`    | the same weights, by parameter name                           |
//! | `mlp.*`            | every parameter under an `mlp` module                         |
//! | `layers.0.*`       | every parameter of layer 0 (not of layer 10)                  |
//! | `*attn*`           | every name containing `attn` (the old substring meaning)      |
//! | `proj`             | nothing: no component is named `proj`                         |
//!
//! Each list selects among its own candidates (LoRA: the dense projections; GaLore: 2-D
//! trainable weights; pruning: trainable weights of two or more dimensions), and a pattern that
//! selects none of them is an error naming the key. GaLore's `target` and every `prunable` used
//! to match substrings; a pattern of those lists whose selection differs between the old
//! substring meaning and this rule is an error that spells the substring meaning in this rule
//! (`"*attn*"`), so an old recipe never silently changes what it selects (`select`).

use crate::error::{Error, Result};
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    pub trainable: bool,
    /// Added by a method beside the model's own weights (`add_extra`: LoRA factors,
    /// distillation projections): trained and checkpointed, left out of a model export.
    pub extra: bool,
    /// The one rank its values live on (`run.shard = "full"`, `shard_as_added`): every rank
    /// knows its shape, the others hold no memory for it. None: whole on every rank.
    pub held_by: Option<usize>,
}

impl Param {
    /// Whether its values live on one rank only (`held_by`).
    pub fn is_sharded(&self) -> bool {
        self.held_by.is_some()
    }
}

/// `ParamStore::shard_as_added`: for each tensor as it is registered (name, element count),
/// the rank that holds it, or `None` when every rank keeps it whole.
pub type ShardRule = Box<dyn FnMut(&str, i64) -> Option<usize>>;

pub struct ParamStore {
    device: Device,
    params: Vec<Param>,
    /// Pruning masks (`prune/`): per parameter name, a bool tensor of its shape, true where the
    /// weight is pruned. `apply_masks` zeroes those entries after every optimizer step, so pruned
    /// weights stay exactly zero through training; checkpoints carry the masks beside the
    /// weights (`masks.safetensors`).
    masks: Vec<Mask>,
    /// While the model is built for `run.shard = "full"`: this rank, and which rank holds each
    /// tensor.
    shard_rule: Option<(usize, ShardRule)>,
    /// The first failure to free a tensor's memory under `shard_rule`.
    shard_error: Option<String>,
}

/// A pruning mask and a handle on the weight it applies to (so that the per-step `apply_masks`
/// needs no lookup by name).
struct Mask {
    name: String,
    weight: Tensor,
    pruned: Tensor,
}

impl ParamStore {
    pub fn new(device: Device) -> ParamStore {
        ParamStore {
            device,
            params: Vec::new(),
            masks: Vec::new(),
            shard_rule: None,
            shard_error: None,
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Registers `init` (created on any device) under `name`, moves it to the store's device,
    /// makes it a trainable leaf, and returns a handle that shares its storage.
    pub fn add(&mut self, name: &str, init: Tensor) -> Tensor {
        debug_assert!(
            self.params.iter().all(|p| p.name != name),
            "duplicate parameter {name}"
        );
        let tensor = init.to_device(self.device).detach().set_requires_grad(true);
        let handle = tensor.shallow_clone();
        let rule = self.shard_rule.as_mut();
        let (rank, held_by) = match rule {
            Some((rank, r)) => (*rank, r(name, tensor.numel() as i64)),
            None => (0, None),
        };
        if held_by.is_some_and(|h| h != rank) {
            if let Err(e) = torch_ext::release_storage(&tensor) {
                self.shard_error.get_or_insert(e);
            }
        }
        self.params.push(Param {
            name: name.to_string(),
            tensor,
            trainable: true,
            extra: false,
            held_by,
        });
        handle
    }

    /// `run.shard = "full"`, before the model is built: each trainable tensor registered from
    /// now on is first given its values (the seeded draws stay those of an unsharded run), then
    /// kept by this rank (`rank`) or freed as `rule` says (see `ShardRule`), so that a rank
    /// never holds the whole model. `stop_sharding_as_added` ends it.
    pub fn shard_as_added(&mut self, rank: usize, rule: ShardRule) {
        self.shard_rule = Some((rank, rule));
    }

    /// Ends `shard_as_added`; an error if a tensor's memory could not be freed.
    pub fn stop_sharding_as_added(&mut self) -> Result<()> {
        self.shard_rule = None;
        match self.shard_error.take() {
            Some(e) => Err(Error::Torch(format!("freeing a sharded weight: {e}"))),
            None => Ok(()),
        }
    }

    /// Registers a trainable parameter that a method adds beside the model's own weights
    /// (adapters, projections): saved in checkpoints like any other, but not part of the
    /// model's architecture, so a model export (`hf::export`) leaves it out.
    pub fn add_extra(&mut self, name: &str, init: Tensor) -> Tensor {
        let handle = self.add(name, init);
        if let Some(p) = self.params.last_mut() {
            p.extra = true;
        }
        handle
    }

    /// Registers a buffer: state saved with the model that no optimizer updates and no gradient
    /// flows into (BatchNorm's running statistics).
    pub fn add_buffer(&mut self, name: &str, init: Tensor) -> Tensor {
        debug_assert!(
            self.params.iter().all(|p| p.name != name),
            "duplicate parameter {name}"
        );
        let tensor = init.to_device(self.device).detach();
        let handle = tensor.shallow_clone();
        self.params.push(Param {
            name: name.to_string(),
            tensor,
            trainable: false,
            extra: false,
            held_by: None,
        });
        handle
    }

    /// Normal(0, std) initialised weight, drawn on the CPU generator so that a seed gives the same
    /// model on every device.
    pub fn normal(&mut self, name: &str, shape: &[i64], std: f64) -> Tensor {
        let t = Tensor::randn(shape, (Kind::Float, Device::Cpu)) * std;
        self.add(name, t)
    }

    pub fn ones(&mut self, name: &str, shape: &[i64]) -> Tensor {
        self.add(name, Tensor::ones(shape, (Kind::Float, Device::Cpu)))
    }

    pub fn zeros(&mut self, name: &str, shape: &[i64]) -> Tensor {
        self.add(name, Tensor::zeros(shape, (Kind::Float, Device::Cpu)))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.params.iter()
    }

    pub fn trainable(&self) -> impl Iterator<Item = &Param> {
        self.params.iter().filter(|p| p.trainable)
    }

    /// Freezes the parameter `name`: no gradient flows into it (requires_grad off, shared with the
    /// model's handles) and optimizers leave it out. Returns false when there is no such
    /// parameter.
    pub fn freeze(&mut self, name: &str) -> bool {
        match self.params.iter_mut().find(|p| p.name == name) {
            Some(p) => {
                p.trainable = false;
                let _ = p.tensor.set_requires_grad(false);
                true
            }
            None => false,
        }
    }

    /// Undoes `freeze` (ReLoRA's full-rank warm start trains the base before the adapters).
    pub fn unfreeze(&mut self, name: &str) -> bool {
        match self.params.iter_mut().find(|p| p.name == name) {
            Some(p) => {
                p.trainable = true;
                let _ = p.tensor.set_requires_grad(true);
                true
            }
            None => false,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.params
            .iter()
            .find(|p| p.name == name)
            .map(|p| &p.tensor)
    }

    pub fn num_params(&self) -> i64 {
        self.params.iter().map(|p| p.tensor.numel() as i64).sum()
    }

    pub fn num_trainable(&self) -> i64 {
        self.trainable().map(|p| p.tensor.numel() as i64).sum()
    }

    pub fn bytes(&self) -> i64 {
        self.params.iter().map(|p| bytes_of(&p.tensor)).sum()
    }

    /// Converts every parameter to `kind` in place (the handles the model holds follow).
    pub fn set_kind(&mut self, kind: Kind) {
        tch::no_grad(|| {
            for p in &mut self.params {
                // Integer buffers (counters) keep their kind.
                if !matches!(
                    p.tensor.kind(),
                    Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
                ) {
                    continue;
                }
                if is_released(&p.tensor) {
                    // Held by another rank (`run.shard = "full"`): a new dtype, still no memory.
                    let empty = Tensor::empty(p.tensor.size(), (kind, p.tensor.device()));
                    p.tensor.set_data(&empty);
                    // Failing leaves memory the next gather overwrites: nothing read is wrong.
                    let _ = torch_ext::release_storage(&p.tensor);
                    continue;
                }
                let converted = p.tensor.to_kind(kind);
                p.tensor.set_data(&converted);
            }
        });
    }

    /// Drops every gradient (torch's `zero_grad(set_to_none=True)`): the next backward writes
    /// fresh gradients instead of adding into zeroed buffers, which is faster, and the gradient
    /// memory is free during the forward pass.
    pub fn zero_grad(&mut self) {
        let tensors: Vec<&Tensor> = self.params.iter().map(|p| &p.tensor).collect();
        if let Err(e) = torch_ext::grads_to_none(&tensors) {
            // Only fails if libtorch throws; fall back to zeroing in place.
            tracing::warn!("dropping gradients failed ({e}); zeroing them instead");
            for p in &mut self.params {
                let mut g = p.tensor.grad();
                if g.defined() {
                    let _ = g.detach_().zero_();
                }
            }
        }
    }

    /// Writes all parameters to a safetensors file (on the CPU, in their own dtype).
    pub fn save(&self, path: &Path) -> Result<()> {
        let named: Vec<(&str, Tensor)> = self
            .params
            .iter()
            .map(|p| (p.name.as_str(), p.tensor.detach()))
            .collect();
        write_safetensors(&named, path)
    }

    /// Loads every parameter from a safetensors file, mapped and copied one tensor at a time
    /// (`mapped`). Every key must be present with the same shape, and no extra keys may be
    /// present: a mismatch names the key and both shapes.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let loaded = super::mapped::open(path)?;
        copy_named(
            &mut self.params.iter().map(|p| (p.name.as_str(), &p.tensor)),
            loaded,
            path,
        )
    }
}

impl ParamStore {
    /// Sets (or replaces) the pruning mask of `name` (true = pruned) and zeroes those weights.
    pub fn set_mask(&mut self, name: &str, pruned: Tensor) -> Result<()> {
        let Some(p) = self.get(name) else {
            return Err(Error::Recipe(format!(
                "prune: {name:?} is not a tensor of this model"
            )));
        };
        if p.size() != pruned.size() {
            return Err(Error::Recipe(format!(
                "prune: mask of {name} has shape {:?}, the tensor {:?}",
                pruned.size(),
                p.size()
            )));
        }
        let weight = p.shallow_clone();
        let pruned = pruned.to_device(self.device).to_kind(Kind::Bool);
        self.masks.retain(|m| m.name != name);
        self.masks.push(Mask {
            name: name.to_string(),
            weight,
            pruned,
        });
        self.apply_masks();
        Ok(())
    }

    /// Whether any weight is pruned.
    pub fn has_masks(&self) -> bool {
        !self.masks.is_empty()
    }

    /// Zeroes every pruned weight (call after each optimizer step).
    pub fn apply_masks(&self) {
        if self.masks.is_empty() {
            return;
        }
        tch::no_grad(|| {
            for m in &self.masks {
                let _ = m.weight.shallow_clone().masked_fill_(&m.pruned, 0.0);
            }
        });
    }

    /// Writes the masks to `path` (nothing when there are none).
    pub fn save_masks(&self, path: &Path) -> Result<()> {
        if self.masks.is_empty() {
            return Ok(());
        }
        let named: Vec<(&str, Tensor)> = self
            .masks
            .iter()
            .map(|m| (m.name.as_str(), m.pruned.shallow_clone()))
            .collect();
        write_safetensors(&named, path)
    }

    /// Loads masks written by `save_masks` when `path` exists (a checkpoint of a pruned model);
    /// every name must be a tensor of this model with the same shape.
    pub fn load_masks_if_present(&mut self, path: &Path) -> Result<()> {
        if !path.is_file() {
            return Ok(());
        }
        for (name, mask) in read_safetensors(path)? {
            self.set_mask(&name, mask).map_err(|e| Error::Checkpoint {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })?;
        }
        Ok(())
    }
}

pub fn bytes_of(t: &Tensor) -> i64 {
    t.numel() as i64 * t.kind().elt_size_in_bytes() as i64
}

/// Writes named tensors (moved to the host first where they are not there) as a safetensors
/// file; a failure is a checkpoint error naming `path`. Every writer of a checkpoint's files
/// goes through it.
pub fn write_safetensors<S: AsRef<str>>(named: &[(S, Tensor)], path: &Path) -> Result<()> {
    let host: Vec<(&str, Tensor)> = named
        .iter()
        .map(|(n, t)| (n.as_ref(), t.to_device(Device::Cpu)))
        .collect();
    Tensor::write_safetensors(&host, path).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: crate::error::first_line(&e.to_string()),
    })
}

/// Reads a whole safetensors file into memory; a missing, truncated or corrupt file is one clear
/// error. For small files (optimizer state, masks, adapters); model weights go through
/// `mapped::open`, which copies one tensor at a time.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.is_file() {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            msg: "file not found".into(),
        });
    }
    Tensor::read_safetensors(path).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!(
            "cannot read safetensors (truncated or corrupt?): {}",
            crate::error::first_line(&e.to_string())
        ),
    })
}

/// One tensor as a safetensors header lists it: name, dtype (`F32`, `BF16`, `I64`, ...), shape.
pub struct StoredTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<i64>,
}

/// The tensors a safetensors file holds, read from its header alone (the data is not touched):
/// what a checkpoint holds can be checked before a model is built for it.
pub fn safetensors_header(path: &Path) -> Result<Vec<StoredTensor>> {
    use std::io::Read;
    let err = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let mut file = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| err("not a safetensors file (shorter than its header)".into()))?;
    let len = u64::from_le_bytes(len);
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    // The header is JSON at the start of the file; the format caps it at 100 MB.
    if len > size.saturating_sub(8) || len > 100 << 20 {
        return Err(err(format!(
            "not a safetensors file (header of {len} bytes in a file of {size})"
        )));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| err(format!("cannot read the header: {e}")))?;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| err(format!("malformed safetensors header: {e}")))?;
    let mut out = Vec::new();
    for (name, entry) in map.into_iter().filter(|(k, _)| k != "__metadata__") {
        let dtype = entry.get("dtype").and_then(|d| d.as_str());
        let shape: Option<Vec<i64>> = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|dims| dims.iter().map(|d| d.as_i64()).collect());
        match (dtype, shape) {
            (Some(dtype), Some(shape)) if shape.iter().all(|&d| d >= 0) => out.push(StoredTensor {
                name,
                dtype: dtype.to_string(),
                shape,
            }),
            _ => {
                return Err(err(format!(
                    "malformed safetensors header: entry {name:?} lacks a dtype or a shape"
                )))
            }
        }
    }
    Ok(out)
}

/// A tensor to load into a parameter: one in memory, or one still in a mapped safetensors file
/// (`mapped::Stored`), read only when it is copied.
pub trait Source {
    fn size(&self) -> Vec<i64>;
    fn kind(&self) -> Kind;
    /// Copies into `target`, of the same shape, converting the dtype (under `no_grad`).
    fn copy_to(&self, target: &mut Tensor) -> Result<()>;
}

impl Source for Tensor {
    fn size(&self) -> Vec<i64> {
        Tensor::size(self)
    }

    fn kind(&self) -> Kind {
        Tensor::kind(self)
    }

    fn copy_to(&self, target: &mut Tensor) -> Result<()> {
        target.f_copy_(self)?;
        Ok(())
    }
}

/// Sources joined along dim 0 as `Tensor::cat` and `Tensor::stack` join tensors (fusing a
/// checkpoint's per-expert weights, `moe::fuse_checkpoint_experts`): at once for tensors, as a
/// plan of copies into slices of the target for mapped ones.
pub trait Join: Source + Sized {
    fn cat(parts: Vec<Self>) -> Result<Self>;
    fn stack(parts: Vec<Self>) -> Result<Self>;
}

impl Join for Tensor {
    fn cat(parts: Vec<Tensor>) -> Result<Tensor> {
        Ok(Tensor::f_cat(&parts, 0)?)
    }

    fn stack(parts: Vec<Tensor>) -> Result<Tensor> {
        Ok(Tensor::f_stack(&parts, 0)?)
    }
}

/// Whether `kind` is a floating-point kind (`Tensor::is_floating_point` by kind alone).
fn is_floating(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Half
            | Kind::Float
            | Kind::Double
            | Kind::BFloat16
            | Kind::Float8e5m2
            | Kind::Float8e4m3fn
            | Kind::Float8e5m2fnuz
            | Kind::Float8e4m3fnuz
    )
}

/// Copies `loaded` into `targets` by name, checking that the two sets of names and every shape
/// agree before anything is copied; then copies one tensor at a time (for mapped sources, the
/// only memory this takes is one tensor's dtype conversion at most).
pub fn copy_named<'a, S: Source>(
    targets: &mut dyn Iterator<Item = (&'a str, &'a Tensor)>,
    loaded: Vec<(String, S)>,
    path: &Path,
) -> Result<()> {
    let mut loaded: std::collections::BTreeMap<String, S> = loaded.into_iter().collect();
    let err = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let mut pairs = Vec::new();
    for (name, target) in targets {
        let Some(src) = loaded.remove(name) else {
            return Err(err(format!(
                "missing tensor {name} (expected shape {:?})",
                target.size()
            )));
        };
        // Integer storage of a floating-point parameter would load as a silently different
        // model (integer buffers such as BatchNorm's `num_batches_tracked` stay integers).
        if target.is_floating_point() && !is_floating(src.kind()) {
            return Err(err(format!(
                "tensor {name} is stored as {:?}; weights must be floating point",
                src.kind()
            )));
        }
        if src.size() != target.size() {
            return Err(err(format!(
                "tensor {name} has shape {:?} in the checkpoint but {:?} in the model",
                src.size(),
                target.size()
            )));
        }
        pairs.push((target, src));
    }
    if let Some(extra) = loaded.keys().next() {
        return Err(err(format!("unexpected tensor {extra} (not in the model)")));
    }
    tch::no_grad(|| -> Result<()> {
        // A tensor another rank holds (`run.shard = "full"`) is checked above, not copied.
        for (target, src) in pairs.into_iter().filter(|(t, _)| !is_released(t)) {
            let mut t = target.shallow_clone();
            src.copy_to(&mut t)?;
        }
        Ok(())
    })
}

/// Whether `t` has no memory for its elements (`torch_ext::release_storage`): a weight another
/// rank holds under `run.shard = "full"`.
pub fn is_released(t: &Tensor) -> bool {
    t.numel() > 0 && torch_ext::storage_bytes(t) == 0
}

/// Embedding tables (token and position): excluded from weight decay unless asked.
pub fn is_embedding(name: &str) -> bool {
    name.ends_with("embed_tokens.weight")
        || name.ends_with("wte.weight")
        || name.ends_with("wpe.weight")
        || name.ends_with("embed_in.weight")
}

/// Norm weights and biases: never weight-decayed.
pub fn is_norm_or_bias(name: &str) -> bool {
    name.ends_with(".bias") || name.contains("norm") || name.contains(".ln_")
}

/// The rule in a few words, quoted by the errors that compare it with the substring meaning.
const RULE: &str = "a whole module path or a suffix after '.', '*' any run";

/// Whether `pattern` matches `path` under the rule of the module docs: the whole path or a
/// suffix after a `.`, `*` any run of characters. Applied to module paths as PEFT applies
/// `target_modules`; `param_matches` adds the module path of a parameter name.
pub fn name_matches(pattern: &str, path: &str) -> bool {
    glob(pattern, path)
        || path
            .char_indices()
            .filter(|(_, c)| *c == '.')
            .any(|(i, _)| glob(pattern, &path[i + 1..]))
}

/// Whether `pattern` selects the parameter `name`: it matches the name or, for a `.weight` or
/// `.bias`, the module path before it (so `q_proj` selects `...q_proj.weight` as PEFT's
/// `q_proj` selects the module).
pub fn param_matches(pattern: &str, name: &str) -> bool {
    name_matches(pattern, name)
        || module_path(name).is_some_and(|module| name_matches(pattern, module))
}

/// `a.b.weight` -> `a.b`; None for names that do not end in `.weight` or `.bias`.
fn module_path(name: &str) -> Option<&str> {
    name.strip_suffix(".weight")
        .or_else(|| name.strip_suffix(".bias"))
}

/// Whole-string match where `*` matches any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// The substring meaning GaLore's `target` and `prunable` had before this rule: the pieces
/// between `*`s occur in `name` in order, anywhere. Only for telling users what changed; it
/// equals `param_matches("*{pattern}*", name)`.
fn substring_matches(pattern: &str, name: &str) -> bool {
    let mut rest = name;
    for piece in pattern.split('*') {
        match rest.find(piece) {
            Some(i) => rest = &rest[i + piece.len()..],
            None => return false,
        }
    }
    true
}

/// Which meaning a pattern list had before this rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Before {
    /// The same rule (LoRA's `target` always followed PEFT's).
    SameRule,
    /// Substrings (GaLore's `target`, every `prunable`): a pattern that selects differently
    /// under the two meanings is an error, never a silent change.
    Substring,
}

/// The names among `candidates` that some pattern of `patterns` selects (`param_matches`), in
/// the order of `candidates`. Errors name `key`: a pattern that selects no candidate (`what`
/// says what the candidates are, e.g. "2-D trainable weight"), and with `Before::Substring` a
/// pattern that selects other candidates than it did as a substring, with the spelling that
/// keeps the old meaning.
pub fn select<'a>(
    candidates: &[&'a str],
    patterns: &[String],
    key: &str,
    what: &str,
    before: Before,
) -> Result<Vec<&'a str>> {
    for pattern in patterns {
        let now: Vec<&str> = matching(candidates, |n| param_matches(pattern, n));
        let old: Vec<&str> = match before {
            Before::SameRule => now.clone(),
            Before::Substring => matching(candidates, |n| substring_matches(pattern, n)),
        };
        if now.is_empty() && old.is_empty() {
            return Err(Error::Recipe(format!(
                "{key}: pattern {pattern:?} matches no {what}"
            )));
        }
        if now.is_empty() {
            return Err(Error::Recipe(format!(
                "{key}: pattern {pattern:?} matches no {what} under the name rule ({RULE}); \
                 as a substring it would match {} ({}): write {:?}",
                old.len(),
                examples(&old),
                substring_spelling(pattern, candidates, &old)
            )));
        }
        if now != old {
            // The sets differ, so one of them has a name the other lacks.
            let difference = match old.iter().find(|n| !now.contains(n)) {
                Some(n) => format!("{n:?} only as a substring"),
                None => match now.iter().find(|n| !old.contains(n)) {
                    Some(n) => format!("{n:?} only under the name rule"),
                    None => String::new(),
                },
            };
            return Err(Error::Recipe(format!(
                "{key}: pattern {pattern:?} selects {} under the name rule ({RULE}) but {} as a \
                 substring ({difference}): write {:?} for the substring meaning, or a pattern \
                 both agree on",
                now.len(),
                old.len(),
                substring_spelling(pattern, candidates, &old)
            )));
        }
    }
    Ok(matching(candidates, |n| {
        patterns.iter().any(|p| param_matches(p, n))
    }))
}

fn matching<'a>(candidates: &[&'a str], keep: impl Fn(&str) -> bool) -> Vec<&'a str> {
    candidates.iter().copied().filter(|n| keep(n)).collect()
}

/// Up to two names, for an error line.
fn examples(names: &[&str]) -> String {
    let mut out = names
        .iter()
        .take(2)
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 2 {
        out += ", ...";
    }
    out
}

/// The shortest spelling under the name rule that selects `old` among `candidates`: `P.*` (a
/// module and everything under it) or `*P` when that selects the same, else `*P*`, which always
/// does (it is the substring meaning).
fn substring_spelling(pattern: &str, candidates: &[&str], old: &[&str]) -> String {
    let anywhere = format!(
        "{}{pattern}{}",
        if pattern.starts_with('*') { "" } else { "*" },
        if pattern.ends_with('*') { "" } else { "*" }
    );
    [format!("{pattern}.*"), format!("*{pattern}")]
        .into_iter()
        .find(|p| matching(candidates, |n| param_matches(p, n)) == old)
        .unwrap_or(anywhere)
}

/// The default prunable weights: the weights of convolutions and linear layers (tensors of two
/// or more dimensions named `*.weight`), not norms, biases, embeddings or the LM head.
pub fn default_prunable(name: &str, tensor: &Tensor) -> bool {
    tensor.dim() >= 2
        && name.ends_with(".weight")
        && !is_norm_or_bias(name)
        && !is_embedding(name)
        && !name.ends_with("lm_head.weight")
}

/// The names of the prunable trainable weights of `store` (for `prune.prunable`, GSM's
/// `optim.prunable` and `trainer prune --prunable`, all named by `key`): those that a pattern of
/// `patterns` selects among the tensors of two or more dimensions (`select`, which also refuses
/// patterns whose old substring meaning differs), or the defaults when `patterns` is empty.
pub fn select_prunable(store: &ParamStore, patterns: &[String], key: &str) -> Result<Vec<String>> {
    if patterns.is_empty() {
        let names: Vec<String> = store
            .trainable()
            .filter(|p| default_prunable(&p.name, &p.tensor))
            .map(|p| p.name.clone())
            .collect();
        if names.is_empty() {
            return Err(Error::Recipe(format!(
                "{key}: this model has no prunable weight (no trainable linear or convolution weight)"
            )));
        }
        return Ok(names);
    }
    let candidates: Vec<&str> = store
        .trainable()
        .filter(|p| p.tensor.dim() >= 2)
        .map(|p| p.name.as_str())
        .collect();
    let names = select(
        &candidates,
        patterns,
        key,
        "trainable weight of two or more dimensions",
        Before::Substring,
    )?;
    Ok(names.into_iter().map(str::to_string).collect())
}

#[cfg(test)]
mod tests;
