//! GEMMs with a GELU epilogue through cuBLASLt (CUDA, f16 / bf16): the MLP's activation and its
//! gradient computed in the GEMMs' epilogues instead of element-wise passes of their own
//! ([`super::linear_gelu`], [`super::gelu_linear_backward`]). cuBLASLt's GELU is the tanh
//! approximation, the form [`super::gelu`] computes.

use std::ffi::c_void;
use std::sync::Mutex;

use candle::backend::BackendStorage;
use candle::cuda_backend::cudarc::cublaslt::{result, sys};
use candle::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle::cuda_backend::{DeviceId, WrapErr};
use candle::{bail, CudaDevice, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};

use crate::cuda_launch::contiguous_view;

/// Workspace bytes offered to cuBLASLt (NVIDIA's recommendation for Hopper).
const WORKSPACE: usize = 32 << 20;

/// One cuBLASLt handle per device, created on first use and kept for the process.
struct Handle(sys::cublasLtHandle_t);
// SAFETY: a cuBLASLt handle may be used from any thread (calls are serialised by the stream).
unsafe impl Send for Handle {}
static HANDLES: Mutex<Vec<(DeviceId, Handle)>> = Mutex::new(Vec::new());

/// A cuBLASLt status as a candle error.
fn lt_err(e: result::CublasError) -> candle::Error {
    candle::Error::Msg(format!("cublaslt: {e:?}"))
}

/// The device's cuBLASLt handle.
fn handle(dev: &CudaDevice) -> Result<sys::cublasLtHandle_t> {
    let mut handles = lock(&HANDLES)?;
    if let Some((_, h)) = handles.iter().find(|(id, _)| *id == dev.id()) {
        return Ok(h.0);
    }
    dev.cuda_stream().context().bind_to_thread().w()?;
    let h = result::create_handle().map_err(lt_err)?;
    handles.push((dev.id(), Handle(h)));
    Ok(h)
}

/// A GEMM of [`gemm_gelu`]: device, dtype, `(rows, k, n)` and which epilogue.
#[derive(Clone, Copy, PartialEq)]
struct Problem {
    dev: DeviceId,
    dtype: DType,
    shape: (usize, usize, usize),
    dgelu: bool,
}

/// The heuristic's algorithm for each problem seen, asked once per problem rather than on every
/// call (the same answer; the query is host work in every training step otherwise).
static ALGOS: Mutex<Vec<(Problem, sys::cublasLtMatmulAlgo_t)>> = Mutex::new(Vec::new());

/// Locks one of the tables above.
fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| candle::Error::Msg("cublaslt: table poisoned".into()))
}

/// Which GELU epilogue a [`gemm_gelu`] applies to `z = a · op(w)`.
pub(super) enum Epilogue<'a> {
    /// `w` `(n, k)`, `z = a · wᵀ`: the output is `gelu(z)`, and `z` comes back too (the aux).
    Gelu,
    /// `w` `(k, n)`, `z = a · w`: the output is `z ⊙ gelu'(aux)` for `aux` `(rows, n)`.
    DGelu { aux: (&'a CudaStorage, &'a Layout) },
}

/// Owns a cuBLASLt descriptor and destroys it on drop.
struct Owned<T: Copy>(
    T,
    unsafe fn(T) -> std::result::Result<(), result::CublasError>,
);

impl<T: Copy> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: the descriptor was created by cuBLASLt and is destroyed once, here.
        let _ = unsafe { (self.1)(self.0) };
    }
}

/// A column-major cuBLASLt matrix layout of `rows` × `cols` with leading dimension `ld`.
fn layout(
    ty: sys::cudaDataType,
    rows: usize,
    cols: usize,
    ld: usize,
) -> Result<Owned<sys::cublasLtMatrixLayout_t>> {
    let l =
        result::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64).map_err(lt_err)?;
    Ok(Owned(l, result::destroy_matrix_layout))
}

/// Sets one attribute of a matmul descriptor from a plain value.
fn set_attr<V: Copy>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: V,
) -> Result<()> {
    // SAFETY: `value` is a live value of the attribute's type and size.
    unsafe {
        result::set_matmul_desc_attribute(
            desc,
            attr,
            (&value as *const V).cast(),
            std::mem::size_of::<V>(),
        )
    }
    .map_err(lt_err)
}

/// `a` `(rows, k)` times `w` (row-major, see [`Epilogue`]) with a GELU epilogue, f32
/// accumulation, on the device's stream: returns the `(rows, n)` output in the inputs' dtype
/// (f16 / bf16) and, for [`Epilogue::Gelu`], the pre-activation `(rows, n)`. All row-major and
/// contiguous; `n` must be a multiple of 8 (cuBLASLt's aux rows).
pub(super) fn gemm_gelu(
    (sa, la): (&CudaStorage, &Layout),
    (sw, lw): (&CudaStorage, &Layout),
    (rows, k, n): (usize, usize, usize),
    epilogue: Epilogue,
) -> Result<(CudaStorage, Option<CudaStorage>)> {
    let what = "gemm_gelu";
    let dev = sa.device().clone();
    let ty = match sa.dtype() {
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        other => bail!("{what}: takes f16 / bf16, got {other:?}"),
    };
    if n % 8 != 0
        || [rows, k, n]
            .iter()
            .any(|&v| v == 0 || v > i32::MAX as usize)
    {
        bail!(
            "{what}: (rows, k, n) = ({rows}, {k}, {n}) must be non-empty and fit i32, n a \
             multiple of 8"
        )
    }
    // Column-major view: the output's transpose (n × rows, ld n) = op(w) (n × k) · aᵀ (k × rows),
    // aᵀ being `a` read as column-major (ld k); `w` read as column-major is wᵀ (k × n, ld k) in
    // the forward (op = transpose) and w (n × k, ld n) in the backward.
    let (transa, w_rows, w_cols, kind) = match &epilogue {
        Epilogue::Gelu => (
            1i32,
            k,
            n,
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_AUX,
        ),
        Epilogue::DGelu { .. } => (0i32, n, k, sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DGELU),
    };
    let w_layout = layout(ty, w_rows, w_cols, w_rows)?;
    let a_layout = layout(ty, k, rows, k)?;
    let c_layout = layout(ty, n, rows, n)?;
    let desc = result::create_matmul_desc(
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        sys::cudaDataType::CUDA_R_32F,
    )
    .map_err(lt_err)?;
    let desc = Owned(desc, result::destroy_matmul_desc);
    let pref = Owned(
        result::create_matmul_pref().map_err(lt_err)?,
        result::destroy_matmul_pref,
    );
    use sys::cublasLtMatmulDescAttributes_t as A;
    set_attr(desc.0, A::CUBLASLT_MATMUL_DESC_TRANSA, transa)?;
    set_attr(desc.0, A::CUBLASLT_MATMUL_DESC_EPILOGUE, kind)?;
    set_attr(desc.0, A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, n as i64)?;
    // SAFETY: the preference is live and the value is a usize.
    unsafe {
        result::set_matmul_pref_attribute(
            pref.0,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&WORKSPACE as *const usize).cast(),
            std::mem::size_of::<usize>(),
        )
    }
    .map_err(lt_err)?;
    let lt = handle(&dev)?;
    let problem = Problem {
        dev: dev.id(),
        dtype: sa.dtype(),
        shape: (rows, k, n),
        dgelu: matches!(epilogue, Epilogue::DGelu { .. }),
    };
    let mut algos = lock(&ALGOS)?;
    let algo = match algos.iter().find(|(p, _)| *p == problem) {
        Some((_, algo)) => *algo,
        None => {
            // SAFETY: the descriptors and layouts are live.
            let algo = unsafe {
                result::get_matmul_algo_heuristic(
                    lt, desc.0, w_layout.0, a_layout.0, c_layout.0, c_layout.0, pref.0,
                )
            }
            .map_err(|e| {
                candle::Error::Msg(format!(
                    "{what}: no cuBLASLt algorithm for (rows, k, n) = ({rows}, {k}, {n}): {e:?}"
                ))
            })?
            .algo;
            algos.push((problem, algo));
            algo
        }
    };
    drop(algos);
    let stream = dev.cuda_stream();
    // SAFETY: written by the GEMM before any read.
    let mut workspace = unsafe { dev.alloc::<u8>(WORKSPACE) }?;
    macro_rules! run {
        ($t:ty) => {{
            let a = contiguous_view::<$t>(sa, la, what, "a")?;
            let w = contiguous_view::<$t>(sw, lw, what, "w")?;
            // SAFETY: written by the GEMM before any read.
            let mut out = unsafe { dev.alloc::<$t>(rows * n) }?;
            let mut aux_out = match epilogue {
                Epilogue::Gelu => Some(unsafe { dev.alloc::<$t>(rows * n) }?),
                Epilogue::DGelu { .. } => None,
            };
            {
                let aux_ptr = match (&mut aux_out, &epilogue) {
                    (Some(aux), _) => aux.device_ptr_mut(&stream).0,
                    (None, Epilogue::DGelu { aux: (s, l) }) => {
                        if l.shape().elem_count() != rows * n {
                            bail!(
                                "{what}: aux {:?} must hold {rows} x {n} elements",
                                l.shape()
                            )
                        }
                        contiguous_view::<$t>(s, l, what, "aux")?
                            .device_ptr(&stream)
                            .0
                    }
                    (None, Epilogue::Gelu) => unreachable!("the forward allocates its aux"),
                };
                set_attr(
                    desc.0,
                    A::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                    aux_ptr,
                )?;
                let (a_ptr, _ga) = a.device_ptr(&stream);
                let (w_ptr, _gw) = w.device_ptr(&stream);
                let (out_ptr, _go) = out.device_ptr_mut(&stream);
                let (ws_ptr, _gs) = workspace.device_ptr_mut(&stream);
                let (alpha, beta) = (1f32, 0f32);
                // SAFETY: the pointers are live device views of rows·k (a), n·k (w), rows·n
                // (output, aux) elements and WORKSPACE bytes, used on the stream they belong to.
                unsafe {
                    result::matmul(
                        lt,
                        desc.0,
                        (&alpha as *const f32).cast(),
                        (&beta as *const f32).cast(),
                        w_ptr as *const c_void,
                        w_layout.0,
                        a_ptr as *const c_void,
                        a_layout.0,
                        out_ptr as *const c_void,
                        c_layout.0,
                        out_ptr as *mut c_void,
                        c_layout.0,
                        &algo,
                        ws_ptr as *mut c_void,
                        WORKSPACE,
                        stream.cu_stream() as *mut _,
                    )
                }
                .map_err(lt_err)?;
            }
            let wrap = |s| CudaStorage::wrap_cuda_slice(s, dev.clone());
            (wrap(out), aux_out.map(wrap))
        }};
    }
    Ok(match sa.dtype() {
        DType::BF16 => run!(bf16),
        _ => run!(f16),
    })
}
