//! Files in and out: reading faces ([`image`]), writing PNGs and GIFs, and the paper's LR synthesis
//! ([`degrade`]).
pub mod degrade;
pub mod image;

pub use self::image::{
    check_new, collect_images, create_new, encode_gif, encode_png, encode_png_u8, encode_png_with_text,
    load_hr_face, load_lr_face, load_lr_face_with, read_png_text, save_png, write_file, write_gif, CropMode,
    LoadedFace, NewFile, Partial, LR_SIZE,
};
pub use degrade::{make_lr, make_lr_chw, resize_antialias, resize_antialias_chw, ResizeKernel};
