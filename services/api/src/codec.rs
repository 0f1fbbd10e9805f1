//! The codec of every generated client and server: prost's, with a 1 KiB
//! starting buffer instead of tonic's 8 KiB.
//!
//! A response stream keeps its encode buffer for as long as it is open, so
//! tonic's default cost every WatchBets and WatchRound 8 KiB whatever it
//! sent (BENCHMARKS.md, memory per stream). Our messages are small: a bet
//! event is well under 1 KiB, a request at most 16 KiB, and a buffer grows
//! when a message needs it. The yield threshold (when a stream hands its
//! encoded messages to the transport) stays tonic's 32 KiB.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Starting size of the encode and decode buffers.
const BUFFER_BYTES: usize = 1024;
/// tonic's own yield threshold.
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

/// [`tonic_prost::ProstCodec`] with [`BUFFER_BYTES`] buffers; the
/// generated code names it (`build.rs`, `codec_path`).
#[derive(Debug)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
