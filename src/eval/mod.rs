//! Evaluation: the paper's image metrics (PSNR, SSIM, LR consistency) and the identity metric CS,
//! the cosine similarity of dlib ResNet face descriptors of the SR face and its ground truth.
pub mod face;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod run;
