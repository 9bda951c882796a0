//! Training data: a folder of face images, read as an endless, seeded stream of samples.
//!
//! Sample `i` of the stream is file `perm_e[i mod n]` of epoch e = i / n, where `perm_e` is a
//! Fisher–Yates shuffle keyed by (seed, e); it is flipped horizontally when the Philox draw of
//! (seed, i) is < 0.5 (if flips are on). The order is therefore a pure function of the seed and the
//! sample index, and a checkpoint resumes it by storing the next index alone.
//!
//! Each sample is decoded (any square size ≥ the training size, or centre-cropped), resized with the
//! antialiased filter, optionally flipped, and then given its LR guide by the paper's degradation
//! ([`crate::io::make_lr_chw`]; flipping first keeps the guide consistent). A pool of worker threads
//! decodes ahead of the trainer within a bounded window; results are put back in stream order, so
//! the batches do not depend on thread timing. Unreadable files are skipped (and counted); a folder
//! where no file can be read is an error.
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::io::degrade::{upsample_guide_chw, SR_FACTOR};
use crate::io::{collect_images, load_hr_face, make_lr_chw, CropMode};
use crate::train::{stream_seed, Stream};

/// The image files of a training folder (recursively, sorted by path).
#[derive(Clone, Debug)]
pub struct FaceFolder {
    pub root: PathBuf,
    pub files: Vec<PathBuf>,
}

impl FaceFolder {
    /// List the images under `dir`; an empty folder is an error.
    pub fn open(dir: &Path) -> Result<FaceFolder> {
        if !dir.is_dir() {
            return Err(Error::Config(format!(
                "training data {} is not a folder",
                dir.display()
            )));
        }
        let files = collect_images(&[dir.to_path_buf()])?;
        if files.is_empty() {
            return Err(Error::Config(format!(
                "no images (png, jpg, jpeg, webp, bmp) found in {}",
                dir.display()
            )));
        }
        Ok(FaceFolder {
            root: dir.to_path_buf(),
            files,
        })
    }
}

/// Default share of a training folder held out for validation.
pub const VAL_FRACTION: f64 = 0.05;

/// FNV-1a of a file's path relative to the folder root: a stable, seed-independent key that
/// does not change when other files are added or removed.
fn path_hash(rel: &Path) -> u64 {
    rel.to_string_lossy()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        })
}

impl FaceFolder {
    /// Split off a held-out validation set: the ⌈fraction·n⌉ files with the smallest path hash
    /// (at least one file always stays for training; fraction 0 holds nothing out). The choice
    /// depends only on the file names, never on the run seed, so every run of a folder holds out
    /// the same faces. Returns (training folder, validation files sorted by path).
    pub fn split_validation(self, fraction: f64) -> Result<(FaceFolder, Vec<PathBuf>)> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(Error::Config(format!(
                "validation fraction {fraction} must lie in [0, 1)"
            )));
        }
        let n = self.files.len();
        let k = ((fraction * n as f64).ceil() as usize).min(n.saturating_sub(1));
        let mut ranked: Vec<(u64, usize)> = self
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| (path_hash(f.strip_prefix(&self.root).unwrap_or(f)), i))
            .collect();
        ranked.sort();
        let held: HashSet<usize> = ranked.iter().take(k).map(|r| r.1).collect();
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (i, f) in self.files.into_iter().enumerate() {
            if held.contains(&i) {
                val.push(f);
            } else {
                train.push(f);
            }
        }
        Ok((
            FaceFolder {
                root: self.root,
                files: train,
            },
            val,
        ))
    }
}

/// Fisher–Yates permutation of 0..n for one epoch, keyed by (seed, epoch).
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let key = stream_seed(seed, Stream::Shuffle, epoch);
    let key = [key as u32, (key >> 32) as u32];
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let w = crate::rng::philox4x32([i as u32, (i as u64 >> 32) as u32, 0, 0], key);
        let r = (w[0] as u64) | ((w[1] as u64) << 32);
        perm.swap(i, (r % (i as u64 + 1)) as usize);
    }
    perm
}

/// Whether sample `index` of the stream is flipped (with flips enabled).
pub fn flip_at(seed: u64, index: u64) -> bool {
    crate::rng::uniform(stream_seed(seed, Stream::Flip, 0), index) < 0.5
}

/// Maps stream indices to files, caching the current epoch's permutation.
struct Order {
    n: usize,
    seed: u64,
    epoch: Option<u64>,
    perm: Vec<usize>,
}

impl Order {
    fn new(n: usize, seed: u64) -> Order {
        Order {
            n,
            seed,
            epoch: None,
            perm: Vec::new(),
        }
    }
    fn file_at(&mut self, index: u64) -> usize {
        let (epoch, pos) = (index / self.n as u64, (index % self.n as u64) as usize);
        if self.epoch != Some(epoch) {
            self.perm = epoch_permutation(self.n, self.seed, epoch);
            self.epoch = Some(epoch);
        }
        self.perm[pos]
    }
}

/// One training example: the HR face and its LR guide, both CHW 3×size×size in [0,1].
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub hr: Vec<f32>,
    pub guide: Vec<f32>,
}

/// Mirror each row of a CHW image.
pub fn hflip_chw(img: &mut [f32], width: usize) {
    for row in img.chunks_exact_mut(width) {
        row.reverse();
    }
}

/// Read one face at `size`×`size` (centre-cropped if not square), flip it if asked, and build its
/// LR guide with the paper's degradation.
pub fn load_sample(path: &Path, size: usize, flip: bool) -> Result<Sample> {
    let face = load_hr_face(path, size, CropMode::Center)?;
    let mut hr = face.pixels;
    if flip {
        hflip_chw(&mut hr, size);
    }
    let (_, guide) = make_lr_chw(&hr, size, size);
    Ok(Sample { hr, guide })
}

/// Decoded faces kept in memory across epochs: a face's pixels and its 16×16 LR (per flip) depend
/// only on the file, so each file is decoded and degraded once per run; later draws only convert
/// the pixels, flip them and upsample the cached LR into the guide (the cheap part of
/// [`make_lr_chw`]). The samples are bit-identical to [`load_sample`]'s. Faces whose pixels are
/// exact multiples of 1/255 (any 8-bit image at the training size) are kept as bytes: the 5,941
/// shared faces at 128² take ≈ 330 MB. Faces beyond `budget` bytes are decoded every time.
pub struct FaceCache {
    slots: Vec<OnceLock<Arc<CachedFace>>>,
    budget: usize,
    used: AtomicUsize,
}

struct CachedFace {
    hr: CachedPixels,
    /// The LR of the face, unflipped and flipped, made on first use.
    lr: [OnceLock<Vec<f32>>; 2],
}

enum CachedPixels {
    Bytes(Vec<u8>),
    Floats(Vec<f32>),
}

impl CachedPixels {
    fn new(px: Vec<f32>) -> CachedPixels {
        let bytes: Vec<u8> = px
            .iter()
            .map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        if bytes
            .iter()
            .zip(&px)
            .all(|(&b, &v)| (b as f32 / 255.0).to_bits() == v.to_bits())
        {
            CachedPixels::Bytes(bytes)
        } else {
            CachedPixels::Floats(px)
        }
    }
    fn bytes(&self) -> usize {
        match self {
            CachedPixels::Bytes(b) => b.len(),
            CachedPixels::Floats(f) => 4 * f.len(),
        }
    }
    fn to_f32(&self) -> Vec<f32> {
        match self {
            CachedPixels::Bytes(b) => b.iter().map(|&v| v as f32 / 255.0).collect(),
            CachedPixels::Floats(f) => f.clone(),
        }
    }
}

impl FaceCache {
    /// A cache for `files` faces holding at most `budget` bytes of them.
    pub fn new(files: usize, budget: usize) -> FaceCache {
        FaceCache {
            slots: (0..files).map(|_| OnceLock::new()).collect(),
            budget,
            used: AtomicUsize::new(0),
        }
    }

    /// Bytes of faces held so far.
    pub fn used_bytes(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Sample `file` of `folder` (flipped if asked), as [`load_sample`] makes it, from the cache
    /// when the face is there; a face read for the first time is put there while the budget lasts.
    pub fn sample(&self, folder: &FaceFolder, file: usize, size: usize, flip: bool) -> Result<Sample> {
        let path = &folder.files[file];
        let face = match self.slots[file].get() {
            Some(face) => face.clone(),
            None => {
                let px = load_hr_face(path, size, CropMode::Center)?.pixels;
                let hr = CachedPixels::new(px);
                let cost = hr.bytes() + 2 * 3 * (size / SR_FACTOR).pow(2) * 4;
                if self.used.fetch_add(cost, Ordering::Relaxed) + cost > self.budget {
                    self.used.fetch_sub(cost, Ordering::Relaxed);
                    let mut hr = hr.to_f32();
                    if flip {
                        hflip_chw(&mut hr, size);
                    }
                    let (_, guide) = make_lr_chw(&hr, size, size);
                    return Ok(Sample { hr, guide });
                }
                let face = Arc::new(CachedFace {
                    hr,
                    lr: [OnceLock::new(), OnceLock::new()],
                });
                // Two workers may decode the same new face at once: the first one's copy stays.
                if self.slots[file].set(face).is_err() {
                    self.used.fetch_sub(cost, Ordering::Relaxed);
                }
                self.slots[file].get().expect("set above").clone()
            }
        };
        let mut hr = face.hr.to_f32();
        if flip {
            hflip_chw(&mut hr, size);
        }
        let lsize = size / SR_FACTOR;
        let lr = face.lr[flip as usize].get_or_init(|| make_lr_chw(&hr, size, size).0);
        let guide = upsample_guide_chw(lr, lsize, lsize, size, size);
        Ok(Sample { hr, guide })
    }
}

/// Loader settings.
#[derive(Clone, Debug)]
pub struct LoaderOptions {
    /// Side of the training images (128 for the paper; smaller for fast tests).
    pub image_size: usize,
    pub batch: usize,
    pub flip: bool,
    pub seed: u64,
    /// Decoding threads.
    pub workers: usize,
    /// How many samples may be decoded ahead of the trainer.
    pub prefetch: usize,
    /// Bytes of decoded faces kept in memory ([`FaceCache`]; 0: decode every draw).
    pub cache_bytes: usize,
}

/// A batch in NCHW layout: `hr` and `guide` are [len, 3, size, size].
#[derive(Clone, Debug)]
pub struct Batch {
    pub hr: Vec<f32>,
    pub guide: Vec<f32>,
    pub len: usize,
    pub size: usize,
    /// Index (into the folder's file list) of each sample.
    pub files: Vec<usize>,
}

type Decoded = (u64, usize, std::result::Result<Sample, String>);

struct Ctrl {
    next_claim: u64,
    consumed: u64,
    stop: bool,
}

struct Shared {
    ctrl: Mutex<Ctrl>,
    wake: Condvar,
    /// Files known to be unreadable (not decoded again in later epochs).
    bad: Mutex<HashSet<usize>>,
    cache: FaceCache,
}

/// Decodes the sample stream with a thread pool, in order, from a given index.
pub struct Loader {
    folder: Arc<FaceFolder>,
    opts: LoaderOptions,
    shared: Arc<Shared>,
    rx: Option<Receiver<Decoded>>,
    workers: Vec<JoinHandle<()>>,
    /// Samples that arrived ahead of the one the trainer needs next.
    pending: BTreeMap<u64, (usize, std::result::Result<Sample, String>)>,
    next: u64,
    skipped: Vec<(PathBuf, String)>,
}

impl Loader {
    /// Start decoding at stream index `start` (0 for a fresh run, the checkpoint's value on resume).
    pub fn start(folder: FaceFolder, opts: LoaderOptions, start: u64) -> Result<Loader> {
        if opts.batch == 0 || opts.image_size == 0 {
            return Err(Error::Config("batch and image size must be at least 1".into()));
        }
        if !opts.image_size.is_multiple_of(crate::io::degrade::SR_FACTOR) {
            return Err(Error::Config(format!(
                "image size {} is not a multiple of the ×{} super-resolution factor",
                opts.image_size,
                crate::io::degrade::SR_FACTOR
            )));
        }
        let window = opts.prefetch.max(opts.workers).max(1);
        let folder = Arc::new(folder);
        let shared = Arc::new(Shared {
            ctrl: Mutex::new(Ctrl {
                next_claim: start,
                consumed: start,
                stop: false,
            }),
            wake: Condvar::new(),
            bad: Mutex::new(HashSet::new()),
            cache: FaceCache::new(folder.files.len(), opts.cache_bytes),
        });
        let (tx, rx) = sync_channel(window);
        let mut workers = Vec::new();
        for k in 0..opts.workers.max(1) {
            let (folder, opts, shared, tx) = (folder.clone(), opts.clone(), shared.clone(), tx.clone());
            let h = std::thread::Builder::new()
                .name(format!("srsde-data-{k}"))
                .spawn(move || worker(&folder, &opts, &shared, &tx, window as u64))
                .map_err(|e| Error::Other(format!("cannot start a data loader thread: {e}")))?;
            workers.push(h);
        }
        Ok(Loader {
            folder,
            opts,
            shared,
            rx: Some(rx),
            workers,
            pending: BTreeMap::new(),
            next: start,
            skipped: Vec::new(),
        })
    }

    /// Stream index of the next sample the loader will hand out (what a checkpoint stores).
    pub fn next_sample(&self) -> u64 {
        self.next
    }

    /// Files skipped so far because they could not be read, with the reason.
    pub fn skipped(&self) -> &[(PathBuf, String)] {
        &self.skipped
    }

    pub fn folder(&self) -> &FaceFolder {
        &self.folder
    }

    /// The next `batch` readable samples of the stream.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let (b, s) = (self.opts.batch, self.opts.image_size);
        let plane = 3 * s * s;
        let mut batch = Batch {
            hr: Vec::with_capacity(b * plane),
            guide: Vec::with_capacity(b * plane),
            len: 0,
            size: s,
            files: Vec::with_capacity(b),
        };
        while batch.len < b {
            let (file, result) = self.take(self.next)?;
            self.next += 1;
            {
                let mut c = self.shared.ctrl.lock().map_err(|_| poisoned())?;
                c.consumed = self.next;
            }
            self.shared.wake.notify_all();
            match result {
                Ok(sample) => {
                    batch.hr.extend_from_slice(&sample.hr);
                    batch.guide.extend_from_slice(&sample.guide);
                    batch.files.push(file);
                    batch.len += 1;
                }
                Err(msg) => {
                    let path = &self.folder.files[file];
                    if !self.skipped.iter().any(|(p, _)| p == path) {
                        self.skipped.push((path.clone(), msg));
                    }
                    // Every file has failed once: nothing readable is left to draw.
                    if self.skipped.len() >= self.folder.files.len() {
                        let (p, why) = &self.skipped[0];
                        return Err(Error::Config(format!(
                            "no readable face image in {}: all {} files failed (e.g. {}: {why})",
                            self.folder.root.display(),
                            self.folder.files.len(),
                            p.display()
                        )));
                    }
                }
            }
        }
        Ok(batch)
    }

    /// Wait for stream index `idx`, keeping any that arrive earlier.
    fn take(&mut self, idx: u64) -> Result<(usize, std::result::Result<Sample, String>)> {
        loop {
            if let Some(v) = self.pending.remove(&idx) {
                return Ok(v);
            }
            let rx = self.rx.as_ref().expect("receiver lives until drop");
            let (i, file, r) = rx
                .recv()
                .map_err(|_| Error::Other("the data loader threads stopped unexpectedly".into()))?;
            self.pending.insert(i, (file, r));
        }
    }
}

fn poisoned() -> Error {
    Error::Other("data loader state poisoned by a panicked thread".into())
}

fn worker(folder: &FaceFolder, opts: &LoaderOptions, shared: &Shared, tx: &SyncSender<Decoded>, window: u64) {
    let mut order = Order::new(folder.files.len(), opts.seed);
    loop {
        let idx = {
            let Ok(mut c) = shared.ctrl.lock() else { return };
            while !c.stop && c.next_claim >= c.consumed + window {
                c = match shared.wake.wait(c) {
                    Ok(c) => c,
                    Err(_) => return,
                };
            }
            if c.stop {
                return;
            }
            c.next_claim += 1;
            c.next_claim - 1
        };
        let file = order.file_at(idx);
        let known_bad = shared.bad.lock().map(|b| b.contains(&file)).unwrap_or(false);
        let result = if known_bad {
            Err("unreadable (see the first report)".to_string())
        } else {
            let flip = opts.flip && flip_at(opts.seed, idx);
            shared
                .cache
                .sample(folder, file, opts.image_size, flip)
                .map_err(|e| e.to_string())
        };
        if result.is_err() {
            if let Ok(mut b) = shared.bad.lock() {
                b.insert(file);
            }
        }
        if tx.send((idx, file, result)).is_err() {
            return;
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        if let Ok(mut c) = self.shared.ctrl.lock() {
            c.stop = true;
        }
        self.shared.wake.notify_all();
        self.rx.take();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}
