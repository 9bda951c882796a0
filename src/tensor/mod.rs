//! Tensor: a shape, an element type and a device buffer. No math lives here — every operation is a
//! method of the [`Backend`](crate::backend::Backend) that owns the buffer.
use crate::backend::Backend;
use crate::error::{Error, Result};

/// Storage/compute element type. Master weights and activations are f32; the CUDA backend may
/// compute in TF32/bf16 internally (a compute mode, never a stored format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
}

/// An immutable n-d array on a backend. Cloning is cheap (the buffer is reference counted).
pub struct Tensor<B: Backend> {
    shape: Vec<usize>,
    buf: B::Buf,
}

impl<B: Backend> Clone for Tensor<B> {
    fn clone(&self) -> Self {
        Tensor {
            shape: self.shape.clone(),
            buf: self.buf.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor{:?}", self.shape)
    }
}

impl<B: Backend> Tensor<B> {
    /// Wrap a buffer; `buf` must hold exactly `shape.iter().product()` elements.
    pub fn from_buf(shape: Vec<usize>, buf: B::Buf) -> Self {
        Tensor { shape, buf }
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        DType::F32
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn buf(&self) -> &B::Buf {
        &self.buf
    }
    /// The buffer itself, for an op that updates a tensor it was handed mutably in place (a CPU
    /// buffer shared with other tensors is copied first: `Arc::make_mut`).
    pub fn buf_mut(&mut self) -> &mut B::Buf {
        &mut self.buf
    }
    /// The buffer, giving up the tensor (for ops that reuse an operand's storage).
    pub fn into_buf(self) -> B::Buf {
        self.buf
    }
    /// Same buffer, new shape with the same number of elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("{:?} -> {:?}", self.shape, shape),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            buf: self.buf.clone(),
        })
    }
    /// The 4 dimensions of an NCHW tensor, or a shape error naming `op`.
    pub fn dims4(&self, op: &'static str) -> Result<(usize, usize, usize, usize)> {
        match self.shape[..] {
            [n, c, h, w] => Ok((n, c, h, w)),
            _ => Err(Error::shape(op, format!("expected NCHW, got {:?}", self.shape))),
        }
    }
    pub fn dims2(&self, op: &'static str) -> Result<(usize, usize)> {
        match self.shape[..] {
            [a, b] => Ok((a, b)),
            _ => Err(Error::shape(op, format!("expected 2-d, got {:?}", self.shape))),
        }
    }
    /// Size of dim 0 (the batch).
    pub fn batch(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }
}

/// Check that two shapes are equal, naming the op on failure.
pub fn same_shape(op: &'static str, a: &[usize], b: &[usize]) -> Result<()> {
    if a != b {
        return Err(Error::shape(op, format!("{a:?} vs {b:?}")));
    }
    Ok(())
}

/// A tensor in host memory, independent of any backend: what weight files load into and what
/// tests compare. Row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor { shape, data }
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    /// Upload to a backend.
    pub fn to_device<B: Backend>(&self, backend: &B) -> Result<Tensor<B>> {
        backend.from_f32(&self.shape, &self.data)
    }
    /// Download from a backend.
    pub fn from_device<B: Backend>(backend: &B, t: &Tensor<B>) -> Result<Self> {
        Ok(HostTensor {
            shape: t.shape().to_vec(),
            data: backend.to_f32(t)?,
        })
    }
}
