//! The element types tensors arrive in: fp32, fp16 and bf16. All arithmetic happens in
//! fp32; these conversions are the only place the storage type matters.

use half::{bf16, f16};

/// A floating-point storage type that converts to and from `f32`.
pub trait Element: Copy + Send + Sync + 'static {
    /// The numpy/torch name of the type, for error messages.
    const NAME: &'static str;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// `xs` itself when the storage type is `f32`, so kernels can read it without a copy.
    #[inline(always)]
    fn as_f32_slice(xs: &[Self]) -> Option<&[f32]> {
        let _ = xs;
        None
    }
    /// `xs` itself when the storage type is `f32`, so kernels can write whole vectors to it.
    #[inline(always)]
    fn as_f32_slice_mut(xs: &mut [Self]) -> Option<&mut [f32]> {
        let _ = xs;
        None
    }
}

impl Element for f32 {
    const NAME: &'static str = "float32";
    #[inline(always)]
    fn as_f32_slice(xs: &[Self]) -> Option<&[f32]> {
        Some(xs)
    }
    #[inline(always)]
    fn as_f32_slice_mut(xs: &mut [Self]) -> Option<&mut [f32]> {
        Some(xs)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    const NAME: &'static str = "float16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    const NAME: &'static str = "bfloat16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}
