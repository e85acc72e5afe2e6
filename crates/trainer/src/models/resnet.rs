//! Residual networks for image classification, three families in one file:
//!
//! - ImageNet ResNet-18/34/50/101/152 (He et al. 2015, "Deep Residual Learning for Image
//!   Recognition") exactly as torchvision builds them (`torchvision/models/resnet.py`): a 7x7
//!   stride-2 stem and a 3x3 stride-2 max pool, four stages of basic (two 3x3 convs) or bottleneck
//!   (1x1, 3x3, 1x1 x4) blocks, the stride of a bottleneck on its 3x3 conv ("ResNet v1.5"),
//!   projection shortcuts (1x1 conv + BN) where the shape changes, adaptive average pooling, fc.
//!   `wide_resnet50_2`/`wide_resnet101_2` are torchvision's bottleneck models with the inner 3x3
//!   width doubled (`width_per_group = 128`), not Zagoruyko & Komodakis's WRN.
//! - CIFAR ResNet-20/32/44/56/110 (He et al. 2015, section 4.2): a 3x3 stem with 16 channels,
//!   three stages of n basic blocks with 16/32/64 channels on 32x32 inputs, depth 6n+2. Shortcuts
//!   are the paper's option A by default: identity, and where the shape changes, the input
//!   subsampled by the stride and zero-padded with (c_out - c_in) / 2 channels on each side (as
//!   akamaster/pytorch_resnet_cifar10 pads). Option A is what the paper trained its CIFAR table
//!   with, so the parameter counts (0.27M for ResNet-20) and the published errors refer to it,
//!   and it adds no parameters; option B (`Shortcut::Projection`) is one field away.
//! - Wide ResNet WRN-d-k (Zagoruyko & Komodakis 2016, "Wide Residual Networks"; reference code
//!   szagoruyko/wide-residual-networks and its PyTorch port xternalz/WideResNet-pytorch):
//!   pre-activation basic blocks (BN-ReLU-conv3x3, BN-ReLU-dropout-conv3x3), a 3x3 stem with 16
//!   channels, three stages of (d-4)/6 blocks with 16k, 32k, 64k channels, a final BN-ReLU before
//!   pooling, 1x1 conv shortcuts applied to the pre-activated input where the shape changes.
//!
//! Parameter names are torchvision's state-dict keys (`conv1.weight`, `bn1.running_var`,
//! `layer1.0.conv1.weight`, `layer2.0.downsample.0.weight`, `layer2.0.downsample.1.bias`,
//! `fc.weight`), registered in torchvision's `state_dict()` order, so torchvision checkpoints
//! exported to safetensors load as they are. The CIFAR ResNets use the same names. WRN blocks
//! name their layers in forward order (`layerS.B.bn1`, `.conv1`, `.bn2`, `.conv2`, the shortcut
//! conv `.downsample.0` with no BN after it), and the final BN is `bn_final`.
//!
//! BatchNorm keeps torchvision's buffers (`running_mean`, `running_var`, int64
//! `num_batches_tracked`) as non-trainable entries of the `ParamStore`; in train mode
//! `Tensor::batch_norm` normalises with the batch statistics and updates the running ones in place
//! (momentum 0.1, unbiased variance), and the counter is incremented, as `nn.BatchNorm2d` does.
//! Initialisation follows torchvision: convs kaiming-normal (fan_out, ReLU gain), BN weight 1 and
//! bias 0, fc `nn.Linear`'s default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.

use super::params::ParamStore;
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// BatchNorm hyper-parameters of `nn.BatchNorm2d`'s defaults, which torchvision uses.
const BN_MOMENTUM: f64 = 0.1;
const BN_EPS: f64 = 1e-5;

/// The residual block of every stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// conv3x3(stride)-BN-ReLU-conv3x3-BN, add, ReLU (torchvision `BasicBlock`).
    Basic,
    /// conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(x4)-BN, add, ReLU (torchvision
    /// `Bottleneck`).
    Bottleneck,
    /// BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3, add (He et al. 2016, "Identity Mappings
    /// in Deep Residual Networks"; the WRN block).
    PreActBasic,
}

impl Block {
    /// Output channels per unit of stage width.
    pub fn expansion(self) -> i64 {
        match self {
            Block::Bottleneck => 4,
            Block::Basic | Block::PreActBasic => 1,
        }
    }
}

/// The layers before the first stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stem {
    /// conv7x7 stride 2, BN, ReLU, max pool 3x3 stride 2: 224x224 becomes 56x56.
    ImageNet,
    /// conv3x3 stride 1 (then BN, ReLU for post-activation blocks): 32x32 stays 32x32.
    Cifar,
}

/// The shortcut of a block whose input and output shapes differ (first block of a stage).
/// Blocks whose shapes agree always use the identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortcut {
    /// He et al.'s option A: subsample by the stride, zero-pad the new channels. No parameters.
    ZeroPad,
    /// Option B: a 1x1 conv with the stride (followed by BN for post-activation blocks).
    Projection,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResNetConfig {
    pub block: Block,
    pub stem: Stem,
    /// Image channels (3 for RGB).
    pub in_channels: i64,
    /// Channels out of the stem conv: 64 (ImageNet), 16 (CIFAR, WRN).
    pub stem_channels: i64,
    /// Blocks per stage. The first stage keeps the resolution, every later one halves it
    /// (stride 2 in its first block).
    pub stage_blocks: Vec<i64>,
    /// Width of each stage ("planes" in torchvision): its output channels are
    /// `width * block.expansion()`.
    pub stage_widths: Vec<i64>,
    /// Bottleneck only: the inner (3x3) width is `width * width_per_group / 64` (torchvision's
    /// name; 64 for ResNet-50, 128 for wide_resnet50_2).
    pub width_per_group: i64,
    pub shortcut: Shortcut,
    /// PreActBasic only: dropout probability between the two convs of a block (WRN uses 0.3 on
    /// CIFAR).
    pub dropout: f64,
    pub num_classes: i64,
}

fn recipe_err(msg: String) -> Error {
    Error::Recipe(msg)
}

impl ResNetConfig {
    fn imagenet(
        block: Block,
        stage_blocks: [i64; 4],
        width_per_group: i64,
        num_classes: i64,
    ) -> Self {
        ResNetConfig {
            block,
            stem: Stem::ImageNet,
            in_channels: 3,
            stem_channels: 64,
            stage_blocks: stage_blocks.to_vec(),
            stage_widths: vec![64, 128, 256, 512],
            width_per_group,
            shortcut: Shortcut::Projection,
            dropout: 0.0,
            num_classes,
        }
    }

    pub fn resnet18(num_classes: i64) -> Self {
        Self::imagenet(Block::Basic, [2, 2, 2, 2], 64, num_classes)
    }

    pub fn resnet34(num_classes: i64) -> Self {
        Self::imagenet(Block::Basic, [3, 4, 6, 3], 64, num_classes)
    }

    pub fn resnet50(num_classes: i64) -> Self {
        Self::imagenet(Block::Bottleneck, [3, 4, 6, 3], 64, num_classes)
    }

    pub fn resnet101(num_classes: i64) -> Self {
        Self::imagenet(Block::Bottleneck, [3, 4, 23, 3], 64, num_classes)
    }

    pub fn resnet152(num_classes: i64) -> Self {
        Self::imagenet(Block::Bottleneck, [3, 8, 36, 3], 64, num_classes)
    }

    /// torchvision's `wide_resnet50_2`: ResNet-50 with the bottlenecks' 3x3 convs twice as wide.
    pub fn wide_resnet50_2(num_classes: i64) -> Self {
        Self::imagenet(Block::Bottleneck, [3, 4, 6, 3], 128, num_classes)
    }

    pub fn wide_resnet101_2(num_classes: i64) -> Self {
        Self::imagenet(Block::Bottleneck, [3, 4, 23, 3], 128, num_classes)
    }

    /// The ImageNet ResNet of the given depth (18, 34, 50, 101 or 152).
    pub fn resnet(depth: i64, num_classes: i64) -> Result<Self> {
        match depth {
            18 => Ok(Self::resnet18(num_classes)),
            34 => Ok(Self::resnet34(num_classes)),
            50 => Ok(Self::resnet50(num_classes)),
            101 => Ok(Self::resnet101(num_classes)),
            152 => Ok(Self::resnet152(num_classes)),
            _ => Err(recipe_err(format!(
                "resnet depth must be one of 18, 34, 50, 101, 152, got {depth}"
            ))),
        }
    }

    /// CIFAR ResNet of depth 6n+2 (20, 32, 44, 56, 110, 1202), option A shortcuts.
    pub fn cifar_resnet(depth: i64, num_classes: i64) -> Result<Self> {
        if depth < 8 || (depth - 2) % 6 != 0 {
            return Err(recipe_err(format!(
                "cifar resnet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}"
            )));
        }
        Ok(Self::cifar_preset(depth, num_classes))
    }

    /// Depth 6n+2 already checked.
    fn cifar_preset(depth: i64, num_classes: i64) -> Self {
        let n = (depth - 2) / 6;
        ResNetConfig {
            block: Block::Basic,
            stem: Stem::Cifar,
            in_channels: 3,
            stem_channels: 16,
            stage_blocks: vec![n; 3],
            stage_widths: vec![16, 32, 64],
            width_per_group: 64,
            shortcut: Shortcut::ZeroPad,
            dropout: 0.0,
            num_classes,
        }
    }

    pub fn cifar_resnet20(num_classes: i64) -> Self {
        Self::cifar_preset(20, num_classes)
    }

    pub fn cifar_resnet56(num_classes: i64) -> Self {
        Self::cifar_preset(56, num_classes)
    }

    pub fn cifar_resnet110(num_classes: i64) -> Self {
        Self::cifar_preset(110, num_classes)
    }

    /// WRN-depth-widen: depth 6n+4 (10, 16, 22, 28, 40), widen factor k >= 1, no dropout (set
    /// `dropout` for the paper's 0.3).
    pub fn wrn(depth: i64, widen: i64, num_classes: i64) -> Result<Self> {
        if depth < 10 || (depth - 4) % 6 != 0 {
            return Err(recipe_err(format!(
                "wide resnet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40), got {depth}"
            )));
        }
        if widen < 1 {
            return Err(recipe_err(format!(
                "wide resnet widen factor must be >= 1, got {widen}"
            )));
        }
        let n = (depth - 4) / 6;
        Ok(ResNetConfig {
            block: Block::PreActBasic,
            stem: Stem::Cifar,
            in_channels: 3,
            stem_channels: 16,
            stage_blocks: vec![n; 3],
            stage_widths: vec![16 * widen, 32 * widen, 64 * widen],
            width_per_group: 64,
            shortcut: Shortcut::Projection,
            dropout: 0.0,
            num_classes,
        })
    }

    /// Channels into the classifier.
    pub fn num_features(&self) -> i64 {
        self.stage_widths
            .last()
            .copied()
            .unwrap_or(self.stem_channels)
            * self.block.expansion()
    }

    /// Checks the ranges that `ResNet::new` relies on; each error names the field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("in_channels", self.in_channels),
            ("stem_channels", self.stem_channels),
            ("num_classes", self.num_classes),
            ("width_per_group", self.width_per_group),
        ];
        for (field, value) in positive {
            if value < 1 {
                return Err(recipe_err(format!(
                    "resnet {field} must be >= 1, got {value}"
                )));
            }
        }
        if self.stage_blocks.is_empty() || self.stage_blocks.len() != self.stage_widths.len() {
            return Err(recipe_err(format!(
                "resnet stage_blocks and stage_widths must be non-empty and of equal length, got {} and {}",
                self.stage_blocks.len(),
                self.stage_widths.len()
            )));
        }
        if let Some(b) = self.stage_blocks.iter().find(|&&b| b < 1) {
            return Err(recipe_err(format!(
                "resnet stage_blocks must all be >= 1, got {b}"
            )));
        }
        if let Some(w) = self.stage_widths.iter().find(|&&w| w < 1) {
            return Err(recipe_err(format!(
                "resnet stage_widths must all be >= 1, got {w}"
            )));
        }
        let too_thin = self
            .stage_widths
            .iter()
            .find(|&&w| w * self.width_per_group / 64 < 1);
        if let (Block::Bottleneck, Some(w)) = (self.block, too_thin) {
            return Err(recipe_err(format!(
                "resnet bottleneck width {w} * width_per_group {} / 64 must be >= 1",
                self.width_per_group
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(recipe_err(format!(
                "resnet dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.dropout > 0.0 && self.block != Block::PreActBasic {
            return Err(recipe_err(format!(
                "resnet dropout is defined for the pre-activation (WRN) block only, got {} with {:?} blocks",
                self.dropout, self.block
            )));
        }
        if self.shortcut == Shortcut::ZeroPad {
            // Zero padding can add channels, never remove them.
            let mut c_in = self.stem_channels;
            for &w in &self.stage_widths {
                let c_out = w * self.block.expansion();
                if c_out < c_in {
                    return Err(recipe_err(format!(
                        "resnet zero-padding shortcuts need non-decreasing channels, but a stage goes from {c_in} to {c_out}"
                    )));
                }
                c_in = c_out;
            }
        }
        Ok(())
    }
}

/// A bias-free 2-d convolution with "same" padding for odd kernels.
struct Conv {
    weight: Tensor, // [c_out, c_in, k, k]
    stride: i64,
    padding: i64,
}

impl Conv {
    /// torchvision: `kaiming_normal_(w, mode="fan_out", nonlinearity="relu")`, i.e. N(0, 2 / fan_out)
    /// with fan_out = c_out * k * k.
    fn new(s: &mut ParamStore, name: &str, c_in: i64, c_out: i64, k: i64, stride: i64) -> Conv {
        let std = (2.0 / (c_out * k * k) as f64).sqrt();
        let weight = s.normal(&format!("{name}.weight"), &[c_out, c_in, k, k], std);
        Conv {
            weight,
            stride,
            padding: k / 2,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            None::<Tensor>,
            [self.stride; 2],
            [self.padding; 2],
            [1, 1],
            1,
        )
    }
}

/// `nn.BatchNorm2d` with its buffers registered under `{name}.running_mean` etc.
struct BatchNorm {
    weight: Tensor, // [c]
    bias: Tensor,   // [c]
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor, // [] int64
}

impl BatchNorm {
    fn new(s: &mut ParamStore, name: &str, c: i64) -> BatchNorm {
        let cpu = (Kind::Float, Device::Cpu);
        BatchNorm {
            weight: s.ones(&format!("{name}.weight"), &[c]),
            bias: s.zeros(&format!("{name}.bias"), &[c]),
            running_mean: s.add_buffer(&format!("{name}.running_mean"), Tensor::zeros([c], cpu)),
            running_var: s.add_buffer(&format!("{name}.running_var"), Tensor::ones([c], cpu)),
            num_batches_tracked: s.add_buffer(
                &format!("{name}.num_batches_tracked"),
                Tensor::zeros([], (Kind::Int64, Device::Cpu)),
            ),
        }
    }

    /// Train mode: normalise with the batch statistics and fold them into the running ones
    /// (in place). Eval mode: normalise with the running statistics.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        if train {
            tch::no_grad(|| {
                let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
            });
        }
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            BN_MOMENTUM,
            BN_EPS,
            true,
        )
    }
}

enum ShortcutPath {
    Identity,
    /// Option A: `x[:, :, ::stride, ::stride]` with `before` zero channels in front and `after`
    /// behind.
    ZeroPad {
        stride: i64,
        before: i64,
        after: i64,
    },
    /// Option B: 1x1 conv, then BN unless the block is pre-activation.
    Projection {
        conv: Conv,
        bn: Option<BatchNorm>,
    },
}

struct ResidualBlock {
    kind: Block,
    /// Two convs (basic, pre-activation) or three (bottleneck), in forward order.
    convs: Vec<Conv>,
    /// One BN per conv: after it for post-activation blocks, before it for pre-activation.
    bns: Vec<BatchNorm>,
    shortcut: ShortcutPath,
    dropout: f64,
}

impl ResidualBlock {
    /// Registers the block's tensors in torchvision's state-dict order (convs and BNs as the
    /// module defines them, then `downsample`).
    fn new(
        s: &mut ParamStore,
        name: &str,
        cfg: &ResNetConfig,
        c_in: i64,
        width: i64,
        stride: i64,
    ) -> Self {
        let c_out = width * cfg.block.expansion();
        let mut convs = Vec::new();
        let mut bns = Vec::new();
        match cfg.block {
            Block::Basic => {
                convs.push(Conv::new(
                    s,
                    &format!("{name}.conv1"),
                    c_in,
                    width,
                    3,
                    stride,
                ));
                bns.push(BatchNorm::new(s, &format!("{name}.bn1"), width));
                convs.push(Conv::new(s, &format!("{name}.conv2"), width, width, 3, 1));
                bns.push(BatchNorm::new(s, &format!("{name}.bn2"), width));
            }
            Block::Bottleneck => {
                let inner = width * cfg.width_per_group / 64;
                convs.push(Conv::new(s, &format!("{name}.conv1"), c_in, inner, 1, 1));
                bns.push(BatchNorm::new(s, &format!("{name}.bn1"), inner));
                convs.push(Conv::new(
                    s,
                    &format!("{name}.conv2"),
                    inner,
                    inner,
                    3,
                    stride,
                ));
                bns.push(BatchNorm::new(s, &format!("{name}.bn2"), inner));
                convs.push(Conv::new(s, &format!("{name}.conv3"), inner, c_out, 1, 1));
                bns.push(BatchNorm::new(s, &format!("{name}.bn3"), c_out));
            }
            Block::PreActBasic => {
                bns.push(BatchNorm::new(s, &format!("{name}.bn1"), c_in));
                convs.push(Conv::new(
                    s,
                    &format!("{name}.conv1"),
                    c_in,
                    width,
                    3,
                    stride,
                ));
                bns.push(BatchNorm::new(s, &format!("{name}.bn2"), width));
                convs.push(Conv::new(s, &format!("{name}.conv2"), width, width, 3, 1));
            }
        }
        let shortcut = if stride == 1 && c_in == c_out {
            ShortcutPath::Identity
        } else {
            match cfg.shortcut {
                Shortcut::ZeroPad => {
                    let before = (c_out - c_in) / 2;
                    ShortcutPath::ZeroPad {
                        stride,
                        before,
                        after: c_out - c_in - before,
                    }
                }
                Shortcut::Projection => ShortcutPath::Projection {
                    conv: Conv::new(s, &format!("{name}.downsample.0"), c_in, c_out, 1, stride),
                    bn: (cfg.block != Block::PreActBasic)
                        .then(|| BatchNorm::new(s, &format!("{name}.downsample.1"), c_out)),
                },
            }
        };
        ResidualBlock {
            kind: cfg.block,
            convs,
            bns,
            shortcut,
            dropout: cfg.dropout,
        }
    }

    fn shortcut(&self, x: &Tensor, train: bool) -> Tensor {
        match &self.shortcut {
            ShortcutPath::Identity => x.shallow_clone(),
            ShortcutPath::ZeroPad {
                stride,
                before,
                after,
            } => x
                .slice(2, None, None, *stride)
                .slice(3, None, None, *stride) // [b, c_in, h/s, w/s]
                .constant_pad_nd([0, 0, 0, 0, *before, *after]), // [b, c_out, h/s, w/s]
            ShortcutPath::Projection { conv, bn } => {
                let y = conv.forward(x);
                match bn {
                    Some(bn) => bn.forward(&y, train),
                    None => y,
                }
            }
        }
    }

    /// [b, c_in, h, w] -> [b, c_out, h/stride, w/stride]
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let (c, bn) = (&self.convs, &self.bns);
        match self.kind {
            Block::Basic => {
                let y = bn[0].forward(&c[0].forward(x), train).relu();
                let y = bn[1].forward(&c[1].forward(&y), train);
                (y + self.shortcut(x, train)).relu()
            }
            Block::Bottleneck => {
                let y = bn[0].forward(&c[0].forward(x), train).relu(); // [b, inner, h, w]
                let y = bn[1].forward(&c[1].forward(&y), train).relu(); // [b, inner, h/s, w/s]
                let y = bn[2].forward(&c[2].forward(&y), train); // [b, c_out, h/s, w/s]
                (y + self.shortcut(x, train)).relu()
            }
            Block::PreActBasic => {
                // A projection shortcut sees the pre-activated input (He et al. 2016, WRN code);
                // the identity sees the raw one.
                let pre = bn[0].forward(x, train).relu();
                let shortcut = match self.shortcut {
                    ShortcutPath::Identity => x.shallow_clone(),
                    _ => self.shortcut(&pre, train),
                };
                let y = c[0].forward(&pre);
                let y = bn[1].forward(&y, train).relu().dropout(self.dropout, train);
                c[1].forward(&y) + shortcut
            }
        }
    }
}

pub struct ResNet {
    pub config: ResNetConfig,
    conv1: Conv,
    /// Stem BN for post-activation blocks; pre-activation stems are a bare conv.
    bn1: Option<BatchNorm>,
    stages: Vec<Vec<ResidualBlock>>,
    /// Pre-activation only: the BN-ReLU that the last block leaves to the network.
    bn_final: Option<BatchNorm>,
    fc_weight: Tensor, // [classes, features]
    fc_bias: Tensor,   // [classes]
}

impl ResNet {
    /// Registers every tensor in `store` under its torchvision name, initialised as torchvision
    /// does; tensors are drawn on the CPU generator so a seed gives the same model on any device.
    pub fn new(cfg: &ResNetConfig, s: &mut ParamStore) -> Result<ResNet> {
        cfg.validate()?;
        let pre_act = cfg.block == Block::PreActBasic;
        let conv1 = match cfg.stem {
            Stem::ImageNet => Conv::new(s, "conv1", cfg.in_channels, cfg.stem_channels, 7, 2),
            Stem::Cifar => Conv::new(s, "conv1", cfg.in_channels, cfg.stem_channels, 3, 1),
        };
        let bn1 = (!pre_act).then(|| BatchNorm::new(s, "bn1", cfg.stem_channels));
        let mut stages = Vec::new();
        let mut c_in = cfg.stem_channels;
        for (i, (&blocks, &width)) in cfg.stage_blocks.iter().zip(&cfg.stage_widths).enumerate() {
            let mut stage = Vec::new();
            for j in 0..blocks {
                let stride = if i > 0 && j == 0 { 2 } else { 1 };
                let name = format!("layer{}.{j}", i + 1);
                stage.push(ResidualBlock::new(s, &name, cfg, c_in, width, stride));
                c_in = width * cfg.block.expansion();
            }
            stages.push(stage);
        }
        let bn_final = pre_act.then(|| BatchNorm::new(s, "bn_final", c_in));
        // nn.Linear's default: kaiming_uniform(a = sqrt(5)) for the weight, which is
        // U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias.
        let bound = 1.0 / (c_in as f64).sqrt();
        let uniform =
            |shape: &[i64]| Tensor::rand(shape, (Kind::Float, Device::Cpu)) * (2.0 * bound) - bound;
        let fc_weight = s.add("fc.weight", uniform(&[cfg.num_classes, c_in]));
        let fc_bias = s.add("fc.bias", uniform(&[cfg.num_classes]));
        Ok(ResNet {
            config: cfg.clone(),
            conv1,
            bn1,
            stages,
            bn_final,
            fc_weight,
            fc_bias,
        })
    }

    /// Logits [b, classes] for images [b, in_channels, h, w]. `train` selects batch statistics
    /// (updating the running ones) and dropout.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = self.conv1.forward(x); // [b, stem, h/2, w/2] (ImageNet) or [b, stem, h, w]
        if let Some(bn) = &self.bn1 {
            x = bn.forward(&x, train).relu();
        }
        if self.config.stem == Stem::ImageNet {
            x = x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false); // [b, stem, h/4, w/4]
        }
        for block in self.stages.iter().flatten() {
            x = block.forward(&x, train);
        }
        // [b, features, h/32, w/32] (ImageNet) or [b, features, h/4, w/4] (CIFAR)
        if let Some(bn) = &self.bn_final {
            x = bn.forward(&x, train).relu();
        }
        let x = x.adaptive_avg_pool2d([1, 1]).flatten(1, -1); // [b, features]
        x.linear(&self.fc_weight, Some(&self.fc_bias)) // [b, classes]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::sgd::Sgd;

    fn build(cfg: &ResNetConfig) -> (ResNet, ParamStore) {
        tch::manual_seed(0);
        let mut store = ParamStore::new(Device::Cpu);
        let model = ResNet::new(cfg, &mut store).expect("valid config");
        (model, store)
    }

    /// Every element of a boolean tensor is true.
    fn all(t: &Tensor) -> bool {
        t.all().int64_value(&[]) != 0
    }

    /// Trainable parameter count, in units of 0.01M or 0.1M as the papers round.
    fn rounded(count: i64, unit: f64) -> i64 {
        (count as f64 / unit).round() as i64
    }

    #[test]
    fn cifar_resnet_parameter_counts_match_the_paper() {
        // He et al. 2015, table 6 (option A): ResNet-20 0.27M, 56 0.85M, 110 1.7M.
        // ResNet-20 exactly: stem 3*16*9 + 32 (BN); stage 1: 6 convs 16*16*9 + 6 BNs 32;
        // stage 2: 16*32*9 + 5 * 32*32*9 + 6 * 64; stage 3: 32*64*9 + 5 * 64*64*9 + 6 * 128;
        // fc 64*10 + 10.
        let exact = 432
            + 32
            + 6 * 2304
            + 6 * 32
            + 4608
            + 5 * 9216
            + 6 * 64
            + 18432
            + 5 * 36864
            + 6 * 128
            + 650;
        assert_eq!(exact, 269_722);
        let (_, store) = build(&ResNetConfig::cifar_resnet20(10));
        assert_eq!(store.num_trainable(), exact);
        let (_, store) = build(&ResNetConfig::cifar_resnet56(10));
        assert_eq!(rounded(store.num_trainable(), 1e4), 85);
        let (_, store) = build(&ResNetConfig::cifar_resnet110(10));
        assert_eq!(rounded(store.num_trainable(), 1e5), 17);
        // Option B adds two projections, 16->32 and 32->64, each a 1x1 conv and a BN.
        let b = ResNetConfig {
            shortcut: Shortcut::Projection,
            ..ResNetConfig::cifar_resnet20(10)
        };
        let (_, store) = build(&b);
        assert_eq!(
            store.num_trainable(),
            exact + 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
        );
    }

    #[test]
    fn wrn_parameter_counts_match_the_paper() {
        // Zagoruyko & Komodakis 2016, tables 1 and 4 (CIFAR-10): WRN-40-1 0.6M, WRN-40-4 8.9M,
        // WRN-16-8 11.0M, WRN-28-10 36.5M.
        for (depth, widen, tenths_of_millions) in
            [(40, 1, 6), (40, 4, 89), (16, 8, 110), (28, 10, 365)]
        {
            let (_, store) = build(&ResNetConfig::wrn(depth, widen, 10).expect("valid"));
            let n = store.num_trainable();
            assert_eq!(
                rounded(n, 1e5),
                tenths_of_millions,
                "WRN-{depth}-{widen} has {n} parameters"
            );
        }
    }

    #[test]
    fn torchvision_parameter_counts() {
        // torchvision's model docs ("num_params"): resnet18 11,689,512; resnet50 25,557,032.
        let (_, store) = build(&ResNetConfig::resnet18(1000));
        assert_eq!(store.num_trainable(), 11_689_512);
        let (_, store) = build(&ResNetConfig::resnet50(1000));
        assert_eq!(store.num_trainable(), 25_557_032);
    }

    #[test]
    fn names_follow_torchvision() {
        let (_, store) = build(&ResNetConfig::cifar_resnet20(10));
        let names: Vec<&str> = store.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            &names[..8],
            [
                "conv1.weight",
                "bn1.weight",
                "bn1.bias",
                "bn1.running_mean",
                "bn1.running_var",
                "bn1.num_batches_tracked",
                "layer1.0.conv1.weight",
                "layer1.0.bn1.weight"
            ]
        );
        assert_eq!(names[names.len() - 2..], ["fc.weight", "fc.bias"]);
        assert!(
            !names.iter().any(|n| n.contains("downsample")),
            "option A has no shortcut weights"
        );
        assert_eq!(
            store.get("bn1.num_batches_tracked").map(|t| t.kind()),
            Some(Kind::Int64)
        );
        assert!(store
            .iter()
            .filter(|p| !p.trainable)
            .all(|p| p.name.contains(".running_") || p.name.ends_with(".num_batches_tracked")));

        let (_, store) = build(&ResNetConfig::wrn(16, 2, 10).expect("valid"));
        for name in [
            "conv1.weight",
            "layer1.0.bn1.running_var",
            "layer1.0.downsample.0.weight",
            "layer2.0.downsample.0.weight",
            "bn_final.weight",
        ] {
            assert!(store.get(name).is_some(), "WRN lacks {name}");
        }
        assert!(
            store.get("bn1.weight").is_none()
                && store.get("layer1.0.downsample.1.weight").is_none()
        );
        assert_eq!(
            store.get("layer3.1.conv2.weight").map(|t| t.size()),
            Some(vec![128, 128, 3, 3])
        );
    }

    #[test]
    fn output_shapes_in_both_modes() {
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        for cfg in [
            ResNetConfig::cifar_resnet20(10),
            ResNetConfig {
                shortcut: Shortcut::Projection,
                ..ResNetConfig::cifar_resnet20(100)
            },
            ResNetConfig {
                dropout: 0.3,
                ..ResNetConfig::wrn(10, 2, 7).expect("valid")
            },
            ResNetConfig::resnet18(5),
        ] {
            let (model, _) = build(&cfg);
            for train in [true, false] {
                let y = model.forward(&x, train);
                assert_eq!(y.size(), [2, cfg.num_classes], "{cfg:?} train={train}");
                assert!(all(&y.isfinite()), "{cfg:?} train={train}");
            }
        }
    }

    #[test]
    fn zero_pad_shortcut_subsamples_and_pads_channels() {
        let path = ShortcutPath::ZeroPad {
            stride: 2,
            before: 8,
            after: 8,
        };
        let block = ResidualBlock {
            kind: Block::Basic,
            convs: vec![],
            bns: vec![],
            shortcut: path,
            dropout: 0.0,
        };
        let x = Tensor::randn([1, 16, 4, 4], (Kind::Float, Device::Cpu));
        let y = block.shortcut(&x, true); // [1, 32, 2, 2]
        assert_eq!(y.size(), [1, 32, 2, 2]);
        assert!(all(&y.narrow(1, 0, 8).eq(0.0)));
        assert!(all(&y.narrow(1, 24, 8).eq(0.0)));
        let kept = x.slice(2, None, None, 2).slice(3, None, None, 2);
        assert!(all(&y.narrow(1, 8, 16).eq_tensor(&kept)));
    }

    /// A few SGD steps on one small random batch lower the loss (the model can fit it), and
    /// train mode moves the BN running statistics and counts the batches.
    fn sgd_reduces_loss(cfg: &ResNetConfig) {
        let (model, store) = build(cfg);
        let x = Tensor::randn([8, 3, 16, 16], (Kind::Float, Device::Cpu));
        let labels = Tensor::randint(cfg.num_classes, [8], (Kind::Int64, Device::Cpu));
        let params = store
            .trainable()
            .map(|p| (p.name.clone(), p.tensor.shallow_clone(), true))
            .collect();
        let mut opt = Sgd::new(params, 0.9, 0.0, true, 5e-4);
        let mut store = store;
        let steps = 8;
        let mut losses = Vec::new();
        for _ in 0..steps {
            store.zero_grad();
            let loss = model.forward(&x, true).cross_entropy_for_logits(&labels);
            loss.backward();
            opt.step(0.05).expect("sgd step");
            losses.push(loss.double_value(&[]));
        }
        let (first, last) = (losses[0], losses[steps - 1]);
        assert!(last < 0.8 * first, "{cfg:?}: loss went {losses:?}");
        assert_eq!(
            store
                .get("layer1.0.bn1.num_batches_tracked")
                .map(|t| t.int64_value(&[])),
            Some(steps as i64)
        );
        let var = store.get("layer1.0.bn1.running_var").expect("running var");
        assert!(!all(&var.eq(1.0)), "running variance never updated");
        let eval = tch::no_grad(|| model.forward(&x, false));
        assert!(all(&eval.isfinite()));
    }

    #[test]
    fn sgd_steps_reduce_the_loss_cifar_resnet20() {
        sgd_reduces_loss(&ResNetConfig::cifar_resnet20(10));
    }

    #[test]
    fn sgd_steps_reduce_the_loss_wrn_with_dropout() {
        sgd_reduces_loss(&ResNetConfig {
            dropout: 0.3,
            ..ResNetConfig::wrn(10, 2, 10).expect("valid")
        });
    }

    #[test]
    fn invalid_configs_are_refused_with_the_field() {
        let msg = |r: Result<ResNetConfig>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(
            msg(ResNetConfig::cifar_resnet(21, 10)),
            "cifar resnet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got 21"
        );
        assert_eq!(
            msg(ResNetConfig::wrn(27, 10, 10)),
            "wide resnet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40), got 27"
        );
        assert_eq!(
            msg(ResNetConfig::resnet(20, 10)),
            "resnet depth must be one of 18, 34, 50, 101, 152, got 20"
        );
        let bad = ResNetConfig {
            dropout: 0.2,
            ..ResNetConfig::resnet18(10)
        };
        assert_eq!(
            bad.validate().err().map(|e| e.to_string()).unwrap_or_default(),
            "resnet dropout is defined for the pre-activation (WRN) block only, got 0.2 with Basic blocks"
        );
        let bad = ResNetConfig {
            num_classes: 0,
            ..ResNetConfig::cifar_resnet20(10)
        };
        let mut store = ParamStore::new(Device::Cpu);
        assert_eq!(
            ResNet::new(&bad, &mut store)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
            "resnet num_classes must be >= 1, got 0"
        );
        assert_eq!(
            store.iter().count(),
            0,
            "nothing registered for a refused config"
        );
    }
}
