//! CUDA graphs of candle work: the kernels a closure queues on candle's stream, recorded once and
//! replayed by one launch, without the host's cost per kernel or the device's gaps between
//! launches (a training step of the char-level GPT is about 200 kernels).

use candle::{Device, Result};

/// A recorded sequence of candle's CUDA work ([`CudaGraph::capture`]), replayed by
/// [`CudaGraph::launch`].
///
/// A replay reads and writes the device addresses of the recording and passes the host values
/// the recording passed to its kernels. So the recorded closure must:
/// - read its inputs from tensors made before the capture, refilled in place between launches
///   (`Tensor::slice_set`), and write its results in place into such tensors;
/// - drop every tensor it makes before it returns: what it allocates is the graph's own memory,
///   allocated and freed again by each launch; and drop no tensor made before the capture;
/// - not read the device (`to_scalar`, `to_vec1`), copy from the host, or pass a kernel a host
///   value that must change from launch to launch (a learning rate, a random seed): put such
///   values in a device tensor refilled between launches.
///
/// candle's own kernels copy their shapes and strides to the device (reductions, strided views):
/// while recording, candle takes them from its cache of such parameters, which an eager run of
/// the same work under [`CudaGraph::warm_up`] fills first (a miss is an error, as is a read of
/// the device). Capture fails with an error, not a broken graph, where the CUDA driver or candle
/// sees a violation.
pub struct CudaGraph {
    #[cfg(feature = "cuda")]
    graph: candle::cuda_backend::cudarc::driver::CudaGraph,
    /// Without feature `cuda` there is no graph to hold: no value can be made.
    #[cfg(not(feature = "cuda"))]
    never: std::convert::Infallible,
}

impl std::fmt::Debug for CudaGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaGraph").finish_non_exhaustive()
    }
}

impl CudaGraph {
    /// Runs `run` eagerly with candle's cache of kernel parameters on (this thread only, as is
    /// the capture's): run the work to be recorded once this way, on the thread that captures,
    /// before [`CudaGraph::capture`]. Also loads the kernels and lets cuBLASLt time its algorithms,
    /// which a capture cannot do. Just `run()` on devices other than CUDA.
    pub fn warm_up<T>(device: &Device, run: impl FnOnce() -> Result<T>) -> Result<T> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            let _cache = dev.enable_cuda_graph_htod_cache();
            return run();
        }
        let _ = device;
        run()
    }

    /// Runs `record` once with candle's stream of `device` (a CUDA device) being captured: its
    /// kernels, copies and stream-ordered allocations are recorded, none is executed. Returns the
    /// instantiated graph (uploaded to the device) and `record`'s value. An error on other
    /// devices, in builds without feature `cuda`, and where `record` or the capture fails (the
    /// stream leaves capture mode in every case).
    pub fn capture<T>(device: &Device, record: impl FnOnce() -> Result<T>) -> Result<(Self, T)> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            use candle::cuda_backend::cudarc::driver::sys;
            use candle::cuda_backend::WrapErr;
            let stream = dev.cuda_stream();
            let cache = dev.enable_cuda_graph_htod_cache();
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .w()?;
            let recorded = record();
            drop(cache);
            // An error recorded while capturing (a failed free, say) would make `end_capture`
            // return before it ends the capture: take it first.
            let pending = stream.context().check_err();
            let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            let value = recorded?;
            let failed = |e| candle::Error::Msg(format!("CUDA graph capture failed: {e:?}"));
            pending.map_err(failed)?;
            let Some(graph) = ended.map_err(failed)? else {
                candle::bail!("CUDA graph capture recorded no work")
            };
            graph.upload().w()?;
            return Ok((Self { graph }, value));
        }
        let _ = record;
        candle::bail!("CudaGraph::capture needs a CUDA device (and feature `cuda`), got {device:?}")
    }

    /// Queues one replay of the recorded work on the stream it was recorded on.
    pub fn launch(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            use candle::cuda_backend::WrapErr;
            self.graph.launch().w()
        }
        #[cfg(not(feature = "cuda"))]
        match self.never {}
    }
}
