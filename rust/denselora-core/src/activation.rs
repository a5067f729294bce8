//! The elementwise activations of the branch, by the names adapter configs and callers use.
//! The kernel evaluates them (`kernel::activation`); the algebra asks which symmetries they keep.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// The activation on one side of the branch (after the encoder, or after the decoder).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Identity,
    /// The exact (erf) form, `x · Φ(x)`.
    Gelu,
    /// `x · sigmoid(x)`.
    Silu,
}

impl Activation {
    pub const ALL: [Activation; 3] = [Activation::Identity, Activation::Gelu, Activation::Silu];

    pub const fn name(self) -> &'static str {
        match self {
            Activation::Identity => "identity",
            Activation::Gelu => "gelu",
            Activation::Silu => "silu",
        }
    }

    /// Linear: any invertible change of basis passes through it.
    pub fn is_linear(self) -> bool {
        self == Activation::Identity
    }

    /// Odd (`act(-z) = -act(z)`): a latent dim may be matched with its sign flipped.
    pub fn is_odd(self) -> bool {
        self == Activation::Identity
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Activation {
    type Err = String;

    /// Exactly one of the names `name` returns.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Activation::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| format!("unknown activation {s:?} (expected \"gelu\", \"identity\" or \"silu\")"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_nothing_else_parses() {
        for a in Activation::ALL {
            assert_eq!(a.name().parse::<Activation>().unwrap(), a);
            assert_eq!(serde_json::to_value(a).unwrap(), a.name());
        }
        for bad in ["GELU", "relu", "", "gelu "] {
            assert!(bad.parse::<Activation>().unwrap_err().contains("unknown activation"), "{bad:?}");
        }
    }
}
