//! Which vector backend the kernel runs on: detection of what the CPU has, the process-wide
//! choice (`DENSELORA_KERNEL_ISA`, [`set_isa`]), and the per-backend entry points that carry
//! `#[target_feature]`, with `dispatch!` to call one.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use super::branch::{self, Job};
#[cfg(target_arch = "x86_64")]
use super::simd;
use super::simd::{Elem, Portable};
use crate::error::{ArgumentKind, Error, Result};

/// The vector backend in use: `"avx512bf16"`, `"avx512"`, `"avx2"` or `"portable"`.
pub fn isa() -> &'static str {
    Isa::current().name()
}

/// The backends this CPU can run, widest first (`"portable"` always last).
pub fn available_isas() -> Vec<&'static str> {
    Isa::ALL.iter().filter(|i| i.available()).map(|i| i.name()).collect()
}

/// Use the backend `name` from now on (process-wide), or with `None` the default again (the
/// widest available, or the one `DENSELORA_KERNEL_ISA` names). Results agree between backends
/// to rounding, not bit for bit.
pub fn set_isa(name: Option<&str>) -> Result<()> {
    let code = match name {
        None => 0,
        Some(name) => {
            let isa = Isa::parse(name).ok_or_else(|| {
                Error::argument(
                    "isa",
                    ArgumentKind::Value,
                    format!("unknown kernel ISA {name:?} (expected one of avx512bf16, avx512, avx2, portable)"),
                )
            })?;
            if !isa.available() {
                return Err(Error::argument(
                    "isa",
                    ArgumentKind::Value,
                    format!("this CPU cannot run the {name} kernel (it can: {})", available_isas().join(", ")),
                ));
            }
            isa as u8 + 1
        }
    };
    ISA_OVERRIDE.store(code, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
thread_local! {
    /// The backend kernel calls on this thread use, when set (tests run every backend).
    pub(crate) static FORCE: std::cell::Cell<Option<Isa>> = const { std::cell::Cell::new(None) };
}

/// `set_isa`'s choice: 0 for none, else the `Isa` discriminant + 1.
static ISA_OVERRIDE: AtomicU8 = AtomicU8::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512Bf16,
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    pub(crate) const ALL: [Isa; 4] = [Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Portable];

    fn name(self) -> &'static str {
        match self {
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    fn parse(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == name)
    }

    pub(crate) fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            static FOUND: OnceLock<[bool; 3]> = OnceLock::new();
            let found = FOUND.get_or_init(|| {
                [
                    simd::Avx512::<true>::detect().is_some(),
                    simd::Avx512::<false>::detect().is_some(),
                    simd::Avx2::detect().is_some(),
                ]
            });
            match self {
                Isa::Avx512Bf16 => found[0],
                Isa::Avx512 => found[1],
                Isa::Avx2 => found[2],
                Isa::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// The backend a kernel call on this thread uses: the one a test forces, else `current`.
    pub(crate) fn for_call() -> Isa {
        #[cfg(test)]
        if let Some(isa) = FORCE.with(|f| f.get()) {
            return isa;
        }
        Isa::current()
    }

    /// The backend in use: `set_isa`'s, else the default.
    fn current() -> Isa {
        match ISA_OVERRIDE.load(Ordering::Relaxed) {
            0 => Isa::default_for_process(),
            c => Isa::ALL[c as usize - 1],
        }
    }

    /// The one `DENSELORA_KERNEL_ISA` names if this CPU has it (`DENSELORA_KERNEL_PORTABLE`, the
    /// older switch, still means portable), else the widest available.
    fn default_for_process() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            if std::env::var_os("DENSELORA_KERNEL_PORTABLE").is_some() {
                return Isa::Portable;
            }
            let wanted = std::env::var("DENSELORA_KERNEL_ISA").ok().and_then(|v| Isa::parse(v.trim()));
            match wanted {
                Some(isa) if isa.available() => isa,
                _ => Isa::ALL.into_iter().find(|i| i.available()).unwrap_or(Isa::Portable),
            }
        })
    }

    /// f32 lanes of the backend's vectors.
    pub(crate) fn lanes(self) -> usize {
        match self {
            Isa::Avx512Bf16 | Isa::Avx512 => 16,
            Isa::Avx2 | Isa::Portable => 8,
        }
    }
}

/// The four task kinds, each instantiated once per backend. Only these entry points carry
/// `#[target_feature]`; everything below them is `#[inline(always)]`.
macro_rules! entry_points {
    ($modname:ident, $simd:ty, $make:expr $(, $feat:literal)?) => {
        pub(crate) mod $modname {
            #[allow(unused_imports)]
            use super::*;
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn encode_cols<X: Elem, W: Elem>(job: &Job<'_, X, W>, ks: std::ops::Range<usize>, h: *mut f32) {
                branch::encode_cols::<$simd, X, W>($make, job, ks, h)
            }
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn middle<X: Elem, W: Elem>(job: &Job<'_, X, W>, rows: usize, h: &mut [f32], g: &mut [f32]) {
                branch::middle::<$simd, X, W>($make, job, rows, h, g)
            }
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn decode_cols<X: Elem, W: Elem>(job: &Job<'_, X, W>, os: std::ops::Range<usize>, g: &[f32]) {
                branch::decode_cols::<$simd, X, W>($make, job, os, g)
            }
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn pack_decoder<X: Elem, W: Elem>(job: &Job<'_, X, W>, ps: std::ops::Range<usize>, packed: *mut f32) {
                branch::pack_decoder::<$simd, X, W>($make, job, ps, packed)
            }
            $(#[target_feature(enable = $feat)])?
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn prefill_rows<X: Elem, W: Elem, E: Elem>(
                job: &Job<'_, X, W>,
                encoder: &[E],
                rows: std::ops::Range<usize>,
                packed: &[f32],
                h: &mut [f32],
                g: &mut [f32],
                xbuf: &mut [f32],
            ) {
                branch::prefill_rows::<$simd, X, W, E>($make, job, encoder, rows, packed, h, g, xbuf)
            }
            $(#[target_feature(enable = $feat)])?
            pub unsafe fn widen<T: Elem>(src: &[T], dst: *mut f32) {
                branch::widen::<$simd, T>($make, src, dst)
            }
        }
    };
}

entry_points!(portable, Portable, Portable);
#[cfg(target_arch = "x86_64")]
entry_points!(avx2, simd::Avx2, simd::Avx2::assume(), "avx2,fma,f16c");
#[cfg(target_arch = "x86_64")]
entry_points!(avx512, simd::Avx512<false>, simd::Avx512::<false>::assume(), "avx512f,avx512bw,avx2,fma,f16c");
#[cfg(target_arch = "x86_64")]
entry_points!(
    avx512bf16,
    simd::Avx512<true>,
    simd::Avx512::<true>::assume(),
    "avx512f,avx512bw,avx512bf16,avx2,fma,f16c"
);

/// Dispatch one task to the chosen backend.
macro_rules! dispatch {
    ($isa:expr, $name:ident($($arg:expr),*)) => {{
        // SAFETY (each arm): `Isa` values other than `Portable` are only used when `available`.
        #[cfg(target_arch = "x86_64")]
        {
            use $crate::kernel::isa::{avx2, avx512, avx512bf16, portable, Isa};
            match $isa {
                Isa::Avx512Bf16 => unsafe { avx512bf16::$name($($arg),*) },
                Isa::Avx512 => unsafe { avx512::$name($($arg),*) },
                Isa::Avx2 => unsafe { avx2::$name($($arg),*) },
                Isa::Portable => unsafe { portable::$name($($arg),*) },
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = $isa;
            unsafe { $crate::kernel::isa::portable::$name($($arg),*) }
        }
    }};
}
pub(crate) use dispatch;
