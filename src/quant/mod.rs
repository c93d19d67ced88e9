//! The quantization core: affine group quantizers, bit packing, per-channel factors and
//! whole-tensor quantization at every granularity the methods use.

pub mod affine;
pub mod channel;
pub mod clip;
mod decode;
mod dequantize;
pub mod packing;
pub mod tensor;

pub use affine::{Affine, ParamDtype, ParamVec};
pub use channel::{channel_absmax, key_balancer, separable_channel_scale};
pub use clip::Clip;
pub(crate) use decode::{decode_packed, Params, Slab};
pub use dequantize::STREAM_MIN_BYTES;
pub use packing::{check_bits, pack, packed_len, unpack};
pub use tensor::{quantize, ByteCount, Geometry, Grouping, QuantSpec, QuantizedTensor};
