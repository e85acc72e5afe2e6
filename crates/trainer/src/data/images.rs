//! Image data for classification: whole datasets held in memory as `[n, c, h, w]` uint8 pixels
//! plus int64 labels, training batches with augmentation, and a background thread that prepares
//! them.
//!
//! Sources (`ImageSourceConfig`):
//! - CIFAR-10/100, the binary version (<https://www.cs.toronto.edu/~kriz/cifar.html>): fixed-size
//!   records of 1 label byte (CIFAR-100: coarse then fine label byte) and 3072 pixel bytes (1024
//!   red, 1024 green, 1024 blue, rows top to bottom) in `data_batch_N.bin` / `test_batch.bin`
//!   (CIFAR-10) or `train.bin` / `test.bin` (CIFAR-100);
//! - a folder of images, one sub-directory per class (torchvision's `ImageFolder` layout; class
//!   ids follow the sorted names), PNG and JPEG decoded with the `image` crate, the shorter side
//!   resized (bilinear) then center-cropped to the configured size;
//! - `builtin_shapes`: 10 classes of procedurally drawn shapes and stripes in random colours with
//!   noise, generated from a fixed seed, so that tests and the quickstart need no download.
//!
//! Training batches are a pure function of (seed, step): epoch `e = step / steps_per_epoch` visits
//! the images in a permutation drawn from (seed, e), and the random crop offsets and flips of step
//! `step` come from a stream seeded by (seed, step), as the token loader does, so a resumed run
//! sees exactly the batches of the uninterrupted one. The crop pads with black pixels (value 0
//! before normalisation) and the flip follows the crop, as torchvision's
//! `RandomCrop(32, padding=4)` then `RandomHorizontalFlip()` do.

use super::config::{Cifar100Labels, ImageDataConfig, ImageSourceConfig, Split};
use super::loader::stream_seed;
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use tch::{Kind, Tensor};

/// A dataset in memory. Cloning shares the pixels.
#[derive(Clone)]
pub struct ImageSet {
    /// `[n, channels, height, width]`, row-major.
    pub pixels: Arc<Vec<u8>>,
    pub labels: Arc<Vec<i64>>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Class names in id order (folder names; CIFAR and the built-in set: the ids as text).
    pub classes: Vec<String>,
    /// Where it came from, for messages.
    pub name: String,
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn num_classes(&self) -> i64 {
        self.classes.len() as i64
    }

    fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of image `i`, `[c, h, w]`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[i * n..(i + 1) * n]
    }

    /// All images as a `[n, c, h, w]` uint8 tensor.
    pub fn images_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.pixels[..]).view([
            self.len() as i64,
            self.channels as i64,
            self.height as i64,
            self.width as i64,
        ])
    }

    /// All labels as a `[n]` int64 tensor.
    pub fn labels_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.labels[..])
    }
}

/// Reads (or generates) the images of a source. `key` (`data.train`, `data.valid`) is named in
/// errors.
pub fn open(src: &ImageSourceConfig, key: &str, data: &ImageDataConfig) -> Result<ImageSet> {
    let set = match src {
        ImageSourceConfig::Cifar10 { path, split } => read_cifar(path, Cifar::Ten, *split, key)?,
        ImageSourceConfig::Cifar100 {
            path,
            split,
            labels,
        } => read_cifar(path, Cifar::Hundred(*labels), *split, key)?,
        ImageSourceConfig::Folder { path } => {
            let size = data.image_size as usize;
            read_folder(path, size, data.resize.map_or(size, |r| r as usize), key)?
        }
        ImageSourceConfig::BuiltinShapes { split, images } => {
            let n = images.unwrap_or(match split {
                Split::Train => 5000,
                Split::Test => 1000,
            });
            builtin_shapes(*split, n as usize)
        }
    };
    if set.is_empty() {
        return Err(Error::Data {
            path: format!("{key} = {}", set.name),
            msg: "holds no images".into(),
        });
    }
    Ok(set)
}

// ---- CIFAR ------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cifar {
    Ten,
    Hundred(Cifar100Labels),
}

const CIFAR_PIXELS: usize = 3 * 32 * 32;

impl Cifar {
    fn name(self) -> &'static str {
        match self {
            Cifar::Ten => "CIFAR-10",
            Cifar::Hundred(_) => "CIFAR-100",
        }
    }

    fn label_bytes(self) -> usize {
        match self {
            Cifar::Ten => 1,
            Cifar::Hundred(_) => 2,
        }
    }

    fn record(self) -> usize {
        self.label_bytes() + CIFAR_PIXELS
    }

    fn classes(self) -> usize {
        match self {
            Cifar::Ten => 10,
            Cifar::Hundred(Cifar100Labels::Fine) => 100,
            Cifar::Hundred(Cifar100Labels::Coarse) => 20,
        }
    }

    /// The label of a record: CIFAR-100 records start with the coarse, then the fine label.
    fn label(self, record: &[u8]) -> u8 {
        match self {
            Cifar::Ten | Cifar::Hundred(Cifar100Labels::Coarse) => record[0],
            Cifar::Hundred(Cifar100Labels::Fine) => record[1],
        }
    }

    /// The files of a split inside the dataset directory, in reading order.
    fn files(self, dir: &Path, split: Split, key: &str) -> Result<Vec<PathBuf>> {
        let err = |msg: String| Error::Data {
            path: format!("{key} = {}", dir.display()),
            msg,
        };
        let expected = match self {
            Cifar::Ten => "the CIFAR-10 binary version (cifar-10-batches-bin: data_batch_1.bin .. data_batch_5.bin, test_batch.bin)",
            Cifar::Hundred(_) => "the CIFAR-100 binary version (cifar-100-binary: train.bin, test.bin)",
        };
        if !dir.is_dir() {
            return Err(err(format!("no such directory; expected {expected}")));
        }
        let files = match (self, split) {
            (Cifar::Ten, Split::Train) => {
                let mut numbered: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
                    .map_err(|e| err(format!("cannot list: {e}")))?
                    .filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().to_string();
                        let n = name
                            .strip_prefix("data_batch_")?
                            .strip_suffix(".bin")?
                            .parse()
                            .ok()?;
                        Some((n, e.path()))
                    })
                    .collect();
                numbered.sort();
                numbered.into_iter().map(|(_, p)| p).collect()
            }
            (Cifar::Ten, Split::Test) => vec![dir.join("test_batch.bin")],
            (Cifar::Hundred(_), Split::Train) => vec![dir.join("train.bin")],
            (Cifar::Hundred(_), Split::Test) => vec![dir.join("test.bin")],
        };
        let files: Vec<PathBuf> = files.into_iter().filter(|p| p.is_file()).collect();
        if files.is_empty() {
            let which = match (self, split) {
                (Cifar::Ten, Split::Train) => "data_batch_*.bin",
                (Cifar::Ten, Split::Test) => "test_batch.bin",
                (Cifar::Hundred(_), Split::Train) => "train.bin",
                (Cifar::Hundred(_), Split::Test) => "test.bin",
            };
            return Err(err(format!("no {which} in it; expected {expected}")));
        }
        Ok(files)
    }
}

/// Reads the `split` files of a CIFAR binary directory.
pub fn read_cifar(dir: &Path, kind: Cifar, split: Split, key: &str) -> Result<ImageSet> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for file in kind.files(dir, split, key)? {
        read_cifar_file(&file, kind, key, &mut pixels, &mut labels)?;
    }
    Ok(ImageSet {
        pixels: Arc::new(pixels),
        labels: Arc::new(labels),
        channels: 3,
        height: 32,
        width: 32,
        classes: (0..kind.classes()).map(|c| c.to_string()).collect(),
        name: dir.display().to_string(),
    })
}

/// Appends the records of one CIFAR binary file; checks its size and every label.
pub fn read_cifar_file(
    file: &Path,
    kind: Cifar,
    key: &str,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<i64>,
) -> Result<()> {
    let err = |msg: String| Error::Data {
        path: format!("{key} = {}", file.display()),
        msg,
    };
    let bytes = std::fs::read(file).map_err(|e| err(format!("cannot read: {e}")))?;
    let record = kind.record();
    if bytes.is_empty() {
        return Err(err("is empty".into()));
    }
    if bytes.len() % record != 0 {
        return Err(err(format!(
            "{} bytes is not a whole number of {}-byte {} records ({} label byte{} + {CIFAR_PIXELS} pixel bytes): \
             {} records and {} bytes left over; truncated, or not a {} binary file",
            bytes.len(),
            record,
            kind.name(),
            kind.label_bytes(),
            if kind.label_bytes() == 1 { "" } else { "s" },
            bytes.len() / record,
            bytes.len() % record,
            kind.name()
        )));
    }
    pixels.reserve(bytes.len() / record * CIFAR_PIXELS);
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        let label = kind.label(rec);
        if label as usize >= kind.classes() {
            return Err(err(format!(
                "record {i} has label {label}, but {} has {} classes; not a {} binary file",
                kind.name(),
                kind.classes(),
                kind.name()
            )));
        }
        labels.push(label as i64);
        pixels.extend_from_slice(&rec[kind.label_bytes()..]);
    }
    Ok(())
}

// ---- folder of images -------------------------------------------------------------------------

fn is_image_file(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

/// Reads `dir/<class>/<image>` for every class sub-directory (sorted names = class ids, files in
/// sorted order); every image is resized so that its shorter side is `resize`, then
/// center-cropped to `size` x `size`.
pub fn read_folder(dir: &Path, size: usize, resize: usize, key: &str) -> Result<ImageSet> {
    let err = |path: &Path, msg: String| Error::Data {
        path: format!("{key} = {}", path.display()),
        msg,
    };
    if !dir.is_dir() {
        return Err(err(
            dir,
            "no such directory; expected one sub-directory of images per class".into(),
        ));
    }
    let list = |d: &Path| -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .map_err(|e| err(d, format!("cannot list: {e}")))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        v.sort();
        Ok(v)
    };
    let class_dirs: Vec<PathBuf> = list(dir)?.into_iter().filter(|p| p.is_dir()).collect();
    if class_dirs.is_empty() {
        return Err(err(
            dir,
            "has no class sub-directories; expected one sub-directory of images per class".into(),
        ));
    }
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    let mut classes = Vec::new();
    for (class, cdir) in class_dirs.iter().enumerate() {
        let files: Vec<PathBuf> = list(cdir)?
            .into_iter()
            .filter(|p| is_image_file(p))
            .collect();
        if files.is_empty() {
            return Err(err(cdir, "class folder holds no PNG or JPEG images".into()));
        }
        for f in files {
            let img = image::ImageReader::open(&f)
                .map_err(|e| err(&f, format!("cannot open: {e}")))?
                .with_guessed_format()
                .map_err(|e| err(&f, format!("cannot read: {e}")))?
                .decode()
                .map_err(|e| err(&f, format!("cannot decode: {e}")))?
                .to_rgb8();
            append_chw(&resize_center_crop(&img, size, resize), &mut pixels);
            labels.push(class as i64);
        }
        classes.push(
            cdir.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
        );
    }
    Ok(ImageSet {
        pixels: Arc::new(pixels),
        labels: Arc::new(labels),
        channels: 3,
        height: size,
        width: size,
        classes,
        name: dir.display().to_string(),
    })
}

/// torchvision's `Resize(resize)` (shorter side, bilinear) then `CenterCrop(size)`.
fn resize_center_crop(img: &image::RgbImage, size: usize, resize: usize) -> image::RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (nw, nh) = if w <= h {
        (
            resize,
            ((h * resize) as f64 / w as f64).round().max(1.0) as usize,
        )
    } else {
        (
            ((w * resize) as f64 / h as f64).round().max(1.0) as usize,
            resize,
        )
    };
    let resized = if (nw, nh) == (w, h) {
        img.clone()
    } else {
        image::imageops::resize(
            img,
            nw as u32,
            nh as u32,
            image::imageops::FilterType::Triangle,
        )
    };
    let (x0, y0) = ((nw - size) / 2, (nh - size) / 2);
    image::imageops::crop_imm(&resized, x0 as u32, y0 as u32, size as u32, size as u32).to_image()
}

/// Appends an RGB image (interleaved, HWC) as planes (CHW).
fn append_chw(img: &image::RgbImage, out: &mut Vec<u8>) {
    let raw = img.as_raw();
    for c in 0..3 {
        out.extend(raw.iter().skip(c).step_by(3));
    }
}

// ---- the built-in generated set ---------------------------------------------------------------

/// Class names of the built-in set.
pub const SHAPE_CLASSES: [&str; 10] = [
    "horizontal_stripes",
    "vertical_stripes",
    "diagonal_stripes",
    "checkerboard",
    "disc",
    "ring",
    "square",
    "plus",
    "triangle",
    "x_cross",
];

/// `n` images of the built-in set (class `i % 10` for image `i`), 32x32, the same on every
/// machine: each image is drawn from its own stream seeded by (split, index).
pub fn builtin_shapes(split: Split, n: usize) -> ImageSet {
    const SIZE: usize = 32;
    let base: u64 = match split {
        Split::Train => 0x5EED_0001,
        Split::Test => 0x5EED_0002,
    };
    let mut pixels = Vec::with_capacity(n * 3 * SIZE * SIZE);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = i % 10;
        let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(base, i as i64, 0, 0));
        let mut img = vec![0u8; 3 * SIZE * SIZE];
        draw_shape(&mut rng, class, SIZE, &mut img);
        pixels.extend_from_slice(&img);
        labels.push(class as i64);
    }
    ImageSet {
        pixels: Arc::new(pixels),
        labels: Arc::new(labels),
        channels: 3,
        height: SIZE,
        width: SIZE,
        classes: SHAPE_CLASSES.iter().map(|s| s.to_string()).collect(),
        name: format!(
            "builtin_shapes:{}",
            match split {
                Split::Train => "train",
                Split::Test => "test",
            }
        ),
    }
}

/// Draws one image of `class` into `img` (`[3, s, s]`): a random background colour, the shape in
/// a colour that differs from it in every channel, at a random place and scale, plus noise.
fn draw_shape(rng: &mut ChaCha8Rng, class: usize, s: usize, img: &mut [u8]) {
    let bg: [i32; 3] = [
        rng.gen_range(0..256),
        rng.gen_range(0..256),
        rng.gen_range(0..256),
    ];
    let fg: [i32; 3] = std::array::from_fn(|c| (bg[c] + rng.gen_range(80..176)) % 256);
    let si = s as i32;
    let period = rng.gen_range(2..=4); // stripe half-period
    let phase = rng.gen_range(0..8);
    let cx = rng.gen_range(si / 2 - 6..=si / 2 + 6);
    let cy = rng.gen_range(si / 2 - 6..=si / 2 + 6);
    let r = rng.gen_range(5..=9);
    let thick = rng.gen_range(2..=3);
    let anti = rng.gen_bool(0.5);
    let inside = |x: i32, y: i32| -> bool {
        let (dx, dy) = (x - cx, y - cy);
        let d2 = dx * dx + dy * dy;
        match class {
            0 => ((y + phase) / period) % 2 == 0,
            1 => ((x + phase) / period) % 2 == 0,
            2 => {
                let t = if anti { x + y } else { x - y + si };
                ((t + phase) / period) % 2 == 0
            }
            3 => ((x + phase) / period + (y + phase) / period) % 2 == 0,
            4 => d2 <= r * r,
            5 => d2 <= (r + 2) * (r + 2) && d2 >= (r + 2 - thick) * (r + 2 - thick),
            6 => dx.abs() <= r - 1 && dy.abs() <= r - 1,
            7 => {
                (dx.abs() <= thick / 2 + 1 && dy.abs() <= r + 2)
                    || (dy.abs() <= thick / 2 + 1 && dx.abs() <= r + 2)
            }
            8 => {
                // Upward triangle: apex at (cx, cy - r), base at y = cy + r.
                let top = cy - r;
                let h = 2 * r;
                y >= top && y <= cy + r && 2 * dx.abs() * h <= 2 * r * (y - top) + h
            }
            _ => (dx.abs() - dy.abs()).abs() <= thick / 2 && dx.abs() <= r + 1,
        }
    };
    for y in 0..s {
        for x in 0..s {
            let on = inside(x as i32, y as i32);
            for c in 0..3 {
                let base = if on { fg[c] } else { bg[c] };
                let v = base + rng.gen_range(-24..=24);
                img[c * s * s + y * s + x] = v.clamp(0, 255) as u8;
            }
        }
    }
}

// ---- batches ----------------------------------------------------------------------------------

/// Images `[b, c, h, w]` float32 (normalised) and labels `[b]` int64, on the CPU.
pub struct ImageBatch {
    pub step: i64,
    pub images: Tensor,
    pub labels: Tensor,
}

/// Training augmentation and the normalisation applied to every batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Augment {
    /// Random crop after padding by this many black pixels; 0: none.
    pub crop_padding: usize,
    pub hflip: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Augment {
    pub fn from_config(d: &ImageDataConfig) -> Augment {
        Augment {
            crop_padding: d.crop_padding.max(0) as usize,
            hflip: d.hflip,
            mean: d.mean.map(|m| m as f32),
            std: d.std.map(|s| s as f32),
        }
    }
}

/// The order in which epoch `epoch` visits `n` images: a Fisher-Yates shuffle seeded by
/// (seed, epoch).
pub fn epoch_order(seed: u64, epoch: i64, n: usize) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, epoch, -2, 0));
    let mut order: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let j = rng.gen_range(0..=i);
        order.swap(i, j);
    }
    order
}

/// The images of training step `step` (0-based) given the order of its epoch.
fn step_indices(order: &[u32], batch_size: usize, steps_per_epoch: i64, step: i64) -> &[u32] {
    let i = (step % steps_per_epoch) as usize;
    &order[i * batch_size..(i + 1) * batch_size]
}

/// The training batch of `step`: its images (see `epoch_order`), each randomly cropped and
/// flipped from a stream seeded by (seed, step), then normalised.
pub fn train_batch(
    set: &ImageSet,
    aug: &Augment,
    batch_size: usize,
    seed: u64,
    step: i64,
) -> ImageBatch {
    let spe = (set.len() / batch_size).max(1) as i64;
    let order = epoch_order(seed, step / spe, set.len());
    let indices = step_indices(&order, batch_size, spe, step);
    train_batch_from(set, aug, indices, 0..indices.len(), seed, step)
}

/// The rows `rows` of the batch of `indices` (a data-parallel rank's share): the augmentation
/// draws of every row are taken in order, so that a row's crop and flip do not depend on which
/// rows are built, but only the rows asked for are cropped and normalised.
fn train_batch_from(
    set: &ImageSet,
    aug: &Augment,
    indices: &[u32],
    rows: std::ops::Range<usize>,
    seed: u64,
    step: i64,
) -> ImageBatch {
    let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, step, 0, 0));
    let (c, h, w) = (set.channels, set.height, set.width);
    let p = aug.crop_padding as i64;
    let mut out = Vec::with_capacity(rows.len() * c * h * w);
    let mut labels = Vec::with_capacity(rows.len());
    for (row, &k) in indices.iter().enumerate() {
        let (dx, dy) = if p > 0 {
            (rng.gen_range(0..=2 * p), rng.gen_range(0..=2 * p))
        } else {
            (p, p)
        };
        let flip = aug.hflip && rng.gen_bool(0.5);
        if !rows.contains(&row) {
            continue;
        }
        let src = set.image(k as usize);
        for ch in 0..c {
            let (mean, std) = (aug.mean[ch.min(2)], aug.std[ch.min(2)]);
            let plane = &src[ch * h * w..(ch + 1) * h * w];
            for y in 0..h as i64 {
                let sy = y + dy - p;
                for x in 0..w as i64 {
                    // Crop, then flip: output column x shows the crop's column w-1-x.
                    let cx = if flip { w as i64 - 1 - x } else { x };
                    let sx = cx + dx - p;
                    let v = if sy >= 0 && sy < h as i64 && sx >= 0 && sx < w as i64 {
                        plane[(sy as usize) * w + sx as usize]
                    } else {
                        0
                    };
                    out.push((v as f32 / 255.0 - mean) / std);
                }
            }
        }
        labels.push(set.labels[k as usize]);
    }
    to_batch(out, labels, c, h, w, step)
}

/// Images `[start, start + len)` of `set`, normalised, unaugmented (evaluation).
pub fn eval_batch(set: &ImageSet, aug: &Augment, start: usize, len: usize) -> ImageBatch {
    let (c, h, w) = (set.channels, set.height, set.width);
    let mut out = Vec::with_capacity(len * c * h * w);
    for k in start..start + len {
        let src = set.image(k);
        for ch in 0..c {
            let (mean, std) = (aug.mean[ch.min(2)], aug.std[ch.min(2)]);
            out.extend(
                src[ch * h * w..(ch + 1) * h * w]
                    .iter()
                    .map(|&v| (v as f32 / 255.0 - mean) / std),
            );
        }
    }
    let labels = set.labels[start..start + len].to_vec();
    to_batch(out, labels, c, h, w, -1)
}

fn to_batch(
    pixels: Vec<f32>,
    labels: Vec<i64>,
    c: usize,
    h: usize,
    w: usize,
    step: i64,
) -> ImageBatch {
    let b = labels.len() as i64;
    ImageBatch {
        step,
        images: Tensor::from_slice(&pixels).view([b, c as i64, h as i64, w as i64]),
        labels: Tensor::from_slice(&labels).to_kind(Kind::Int64),
    }
}

/// Prepares training batches for steps `first_step..=last_step` on a background thread, `depth`
/// batches ahead: the rows `rows` of each global batch of `batch_size` (all of them in a single
/// process, a rank's share under data parallelism). Dropping it stops the thread.
pub struct ImagePrefetcher {
    rx: Option<Receiver<ImageBatch>>,
    handle: Option<JoinHandle<()>>,
}

impl ImagePrefetcher {
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        set: ImageSet,
        aug: Augment,
        batch_size: usize,
        rows: std::ops::Range<usize>,
        seed: u64,
        first_step: i64,
        last_step: i64,
        depth: usize,
    ) -> ImagePrefetcher {
        let (tx, rx) = sync_channel(depth.max(1));
        let handle = std::thread::Builder::new()
            .name("image-prefetch".into())
            .spawn(move || {
                let spe = (set.len() / batch_size).max(1) as i64;
                let mut epoch = (-1, Vec::new());
                for step in first_step..=last_step {
                    if epoch.0 != step / spe {
                        epoch = (step / spe, epoch_order(seed, step / spe, set.len()));
                    }
                    let idx = step_indices(&epoch.1, batch_size, spe, step);
                    if tx
                        .send(train_batch_from(&set, &aug, idx, rows.clone(), seed, step))
                        .is_err()
                    {
                        return; // the trainer stopped
                    }
                }
            })
            .ok();
        ImagePrefetcher {
            rx: Some(rx),
            handle,
        }
    }

    /// The next batch, or None when the thread could not be started or has finished.
    pub fn next(&self) -> Option<ImageBatch> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for ImagePrefetcher {
    fn drop(&mut self) {
        drop(self.rx.take()); // unblocks a send in progress
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.reshape([-1])).expect("f32")
    }
    fn longs(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(t.reshape([-1])).expect("i64")
    }

    /// A CIFAR-10 record: label, then 3072 pixel bytes that encode (record, position).
    fn record(label: u8, seed: u8) -> Vec<u8> {
        let mut r = vec![label];
        r.extend((0..CIFAR_PIXELS).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
        r
    }

    fn plain() -> Augment {
        Augment {
            crop_padding: 0,
            hflip: false,
            mean: [0.0; 3],
            std: [1.0; 3],
        }
    }

    #[test]
    fn cifar10_records_parse_into_chw_images_and_labels() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut a = record(3, 1);
        a.extend(record(9, 2));
        std::fs::write(dir.path().join("data_batch_1.bin"), &a).expect("write");
        std::fs::write(dir.path().join("data_batch_2.bin"), record(0, 3)).expect("write");
        std::fs::write(dir.path().join("test_batch.bin"), record(5, 4)).expect("write");
        let train = read_cifar(dir.path(), Cifar::Ten, Split::Train, "data.train").expect("train");
        assert_eq!(train.len(), 3);
        assert_eq!(&train.labels[..], &[3, 9, 0]);
        assert_eq!(train.image(1), &record(9, 2)[1..]);
        assert_eq!(train.image(2), &record(0, 3)[1..]);
        assert_eq!(train.images_tensor().size(), vec![3, 3, 32, 32]);
        // Plane order: the first 1024 bytes are red, row-major.
        let t = train.images_tensor();
        assert_eq!(
            t.int64_value(&[0, 1, 0, 5]),
            record(3, 1)[1 + 1024 + 5] as i64
        );
        let test = read_cifar(dir.path(), Cifar::Ten, Split::Test, "data.valid").expect("test");
        assert_eq!(&test.labels[..], &[5]);
    }

    #[test]
    fn cifar100_reads_fine_or_coarse_labels() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut rec = vec![7u8, 42u8];
        rec.extend(vec![1u8; CIFAR_PIXELS]);
        std::fs::write(dir.path().join("train.bin"), &rec).expect("write");
        let fine = read_cifar(
            dir.path(),
            Cifar::Hundred(Cifar100Labels::Fine),
            Split::Train,
            "k",
        )
        .expect("fine");
        let coarse = read_cifar(
            dir.path(),
            Cifar::Hundred(Cifar100Labels::Coarse),
            Split::Train,
            "k",
        )
        .expect("coarse");
        assert_eq!((&fine.labels[..], fine.num_classes()), (&[42i64][..], 100));
        assert_eq!(
            (&coarse.labels[..], coarse.num_classes()),
            (&[7i64][..], 20)
        );
        assert_eq!(fine.image(0), &vec![1u8; CIFAR_PIXELS][..]);
    }

    #[test]
    fn truncated_or_wrong_cifar_files_are_one_line_errors_naming_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut a = record(1, 0);
        a.extend(&record(2, 0)[..100]);
        std::fs::write(dir.path().join("data_batch_1.bin"), &a).expect("write");
        let e = read_cifar(dir.path(), Cifar::Ten, Split::Train, "data.train")
            .err()
            .expect("error")
            .to_string();
        assert!(
            e.starts_with("data.train = ") && e.contains("data_batch_1.bin"),
            "{e}"
        );
        assert!(
            e.contains("3173 bytes is not a whole number of 3073-byte CIFAR-10 records"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        std::fs::write(dir.path().join("data_batch_1.bin"), record(10, 0)).expect("write");
        let e = read_cifar(dir.path(), Cifar::Ten, Split::Train, "data.train")
            .err()
            .expect("error")
            .to_string();
        assert!(e.contains("record 0 has label 10"), "{e}");
        let e = read_cifar(dir.path(), Cifar::Ten, Split::Test, "data.valid")
            .err()
            .expect("error")
            .to_string();
        assert!(e.contains("no test_batch.bin in it"), "{e}");
        let e = read_cifar(
            &dir.path().join("nope"),
            Cifar::Ten,
            Split::Test,
            "data.valid",
        )
        .err()
        .expect("error")
        .to_string();
        assert!(e.contains("no such directory"), "{e}");
    }

    fn write_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
        let img = image::RgbImage::from_fn(w, h, |x, _| {
            image::Rgb([rgb[0], rgb[1], rgb[2].wrapping_add(x as u8)])
        });
        img.save(path).expect("png");
    }

    #[test]
    fn folder_classes_are_sorted_subdirectories_resized_and_center_cropped() {
        let dir = tempfile::tempdir().expect("tmp");
        for (class, rgb) in [("b_dog", [10u8, 20, 30]), ("a_cat", [200, 100, 0])] {
            std::fs::create_dir(dir.path().join(class)).expect("mkdir");
            write_png(&dir.path().join(class).join("1.png"), 16, 8, rgb);
            write_png(&dir.path().join(class).join("2.PNG"), 8, 8, rgb);
            std::fs::write(dir.path().join(class).join("notes.txt"), "not an image")
                .expect("write");
        }
        let set = read_folder(dir.path(), 4, 4, "data.train").expect("folder");
        assert_eq!(set.classes, vec!["a_cat", "b_dog"]);
        assert_eq!(&set.labels[..], &[0, 0, 1, 1]);
        assert_eq!((set.channels, set.height, set.width), (3, 4, 4));
        // Uniform red and green planes survive resizing; the first pixel is red 200.
        assert_eq!(set.image(0)[0], 200);
        assert!(
            set.image(2)[..16].iter().all(|&v| v == 10),
            "{:?}",
            &set.image(2)[..16]
        );
        assert!(set.image(2)[16..32].iter().all(|&v| v == 20));
    }

    #[test]
    fn empty_class_folder_or_bad_image_is_a_one_line_error() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(dir.path().join("a")).expect("mkdir");
        write_png(&dir.path().join("a").join("x.png"), 4, 4, [1, 2, 3]);
        std::fs::create_dir(dir.path().join("b")).expect("mkdir");
        let e = read_folder(dir.path(), 4, 4, "data.train")
            .err()
            .expect("error")
            .to_string();
        assert!(
            e.contains("/b: class folder holds no PNG or JPEG images"),
            "{e}"
        );
        std::fs::write(dir.path().join("b").join("y.jpg"), b"not a jpeg").expect("write");
        let e = read_folder(dir.path(), 4, 4, "data.train")
            .err()
            .expect("error")
            .to_string();
        assert!(e.contains("y.jpg: cannot decode"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn builtin_shapes_are_deterministic_balanced_and_split_apart() {
        let a = builtin_shapes(Split::Train, 50);
        let b = builtin_shapes(Split::Train, 50);
        let t = builtin_shapes(Split::Test, 50);
        assert_eq!(a.pixels, b.pixels);
        assert_ne!(a.pixels, t.pixels);
        assert_eq!(a.num_classes(), 10);
        for c in 0..10 {
            assert_eq!(a.labels.iter().filter(|&&l| l == c).count(), 5);
        }
    }

    #[test]
    fn augmentation_is_a_pure_function_of_seed_and_step() {
        let set = builtin_shapes(Split::Train, 40);
        let aug = Augment {
            crop_padding: 4,
            hflip: true,
            mean: [0.5; 3],
            std: [0.25; 3],
        };
        let x = train_batch(&set, &aug, 8, 3, 7);
        let y = train_batch(&set, &aug, 8, 3, 7);
        assert_eq!(floats(&x.images), floats(&y.images));
        assert_eq!(longs(&x.labels), longs(&y.labels));
        assert_eq!(x.images.size(), vec![8, 3, 32, 32]);
        assert_ne!(
            floats(&x.images),
            floats(&train_batch(&set, &aug, 8, 3, 8).images)
        );
        assert_ne!(
            floats(&x.images),
            floats(&train_batch(&set, &aug, 8, 4, 7).images)
        );
        // The prefetch thread yields exactly these batches.
        let p = ImagePrefetcher::start(set.clone(), aug.clone(), 8, 0..8, 3, 6, 12, 2);
        for step in 6..=12 {
            let got = p.next().expect("batch");
            assert_eq!(got.step, step);
            assert_eq!(
                floats(&got.images),
                floats(&train_batch(&set, &aug, 8, 3, step).images)
            );
        }
        assert!(p.next().is_none());
        // A rank's share (rows 3..6) is exactly those rows of the whole batch.
        let p = ImagePrefetcher::start(set.clone(), aug.clone(), 8, 3..6, 3, 6, 7, 2);
        for step in 6..=7 {
            let got = p.next().expect("batch");
            let whole = train_batch(&set, &aug, 8, 3, step);
            assert_eq!(got.images.size(), vec![3, 3, 32, 32]);
            assert_eq!(floats(&got.images), floats(&whole.images.narrow(0, 3, 3)));
            assert_eq!(longs(&got.labels), longs(&whole.labels.narrow(0, 3, 3)));
        }
    }

    #[test]
    fn an_epoch_visits_every_image_once() {
        let set = builtin_shapes(Split::Train, 40);
        let mut seen: Vec<i64> = Vec::new();
        for step in 5..10 {
            // Epoch 1 of 5 steps of 8 images; labels identify images up to class, so compare
            // through an identity augmentation: the sum of pixels of each image.
            let b = train_batch(&set, &plain(), 8, 1, step);
            let sums = b
                .images
                .sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Double);
            seen.extend(
                Vec::<f64>::try_from(sums)
                    .expect("f64")
                    .iter()
                    .map(|s| (s * 255.0).round() as i64),
            );
        }
        let mut all: Vec<i64> = (0..40)
            .map(|i| set.image(i).iter().map(|&v| v as i64).sum())
            .collect();
        seen.sort();
        all.sort();
        assert_eq!(seen, all);
    }

    #[test]
    fn crop_pads_black_and_flip_mirrors() {
        // One 8x4 image whose pixel value is its column + 1; a padding of 2, so that row 3 of a
        // crop always comes from the image.
        let mut px = Vec::new();
        for _c in 0..3 {
            for _y in 0..8 {
                px.extend([1u8, 2, 3, 4]);
            }
        }
        let set = ImageSet {
            pixels: Arc::new(px),
            labels: Arc::new(vec![0]),
            channels: 3,
            height: 8,
            width: 4,
            classes: vec!["x".into()],
            name: "t".into(),
        };
        let aug = Augment {
            crop_padding: 2,
            hflip: true,
            mean: [0.0; 3],
            std: [1.0 / 255.0; 3],
        };
        let mut kinds = std::collections::BTreeSet::new();
        for step in 0..40 {
            let b = train_batch(&set, &aug, 1, 0, step);
            let row: Vec<i64> = floats(&b.images)[12..16]
                .iter()
                .map(|v| v.round() as i64)
                .collect();
            // Every row is a window of [0, 0, 1, 2, 3, 4, 0, 0], possibly mirrored.
            let padded = [0i64, 0, 1, 2, 3, 4, 0, 0];
            let ok = (0..=4).any(|o| {
                let win = &padded[o..o + 4];
                row == win || row.iter().rev().eq(win.iter())
            });
            assert!(ok, "step {step}: {row:?}");
            kinds.insert(row);
        }
        assert!(kinds.len() > 4, "crops and flips vary: {kinds:?}");
    }

    #[test]
    fn eval_batches_normalise_per_channel() {
        let set = builtin_shapes(Split::Test, 3);
        let aug = Augment {
            crop_padding: 4,
            hflip: true,
            mean: [0.1, 0.2, 0.3],
            std: [0.5, 0.25, 2.0],
        };
        let b = eval_batch(&set, &aug, 1, 2);
        assert_eq!(b.images.size(), vec![2, 3, 32, 32]);
        let v = floats(&b.images);
        let raw = set.image(1);
        for ch in 0..3 {
            let want = (raw[ch * 1024 + 17] as f32 / 255.0 - aug.mean[ch]) / aug.std[ch];
            assert_eq!(v[ch * 1024 + 17], want);
        }
        assert_eq!(longs(&b.labels), vec![1, 2]);
    }
}
