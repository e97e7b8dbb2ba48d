//! Dewey version numbers (Flink's `DeweyNumber`): they tell which buffer edges
//! belong to which run when runs share buffer nodes.

use smallvec::SmallVec;

#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Dewey(pub SmallVec<[u32; 6]>);

impl Dewey {
    pub fn start() -> Dewey {
        Dewey(smallvec::smallvec![1])
    }

    /// `v + k`: adds `k` to the last digit.
    pub fn increase(&self, k: i64) -> Dewey {
        let mut d = self.0.clone();
        let last = d.len() - 1;
        d[last] = (d[last] as i64 + k) as u32;
        Dewey(d)
    }

    /// `v.0`: appends a digit.
    pub fn add_stage(&self) -> Dewey {
        let mut d = self.0.clone();
        d.push(0);
        Dewey(d)
    }

    /// Flink's `isCompatibleWith`: `self` descends from `other`'s run.
    #[inline]
    pub fn compatible_with(&self, other: &Dewey) -> bool {
        let (a, b) = (self.0.as_slice(), other.0.as_slice());
        let n = b.len();
        if a.len() > n {
            same(&a[..n], b)
        } else if a.len() == n {
            a[n - 1] >= b[n - 1] && same(&a[..n - 1], &b[..n - 1])
        } else {
            false
        }
    }
}

/// Digit-by-digit equality, last digits first (where runs differ most often);
/// cheaper than a `memcmp` call for these short slices.
#[inline]
fn same(a: &[u32], b: &[u32]) -> bool {
    let mut i = a.len();
    while i > 0 {
        i -= 1;
        if a[i] != b[i] {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn compatibility() {
        let v = Dewey::start();
        let t = v.increase(1).add_stage();
        assert!(t.compatible_with(&v.increase(1)));
        assert!(!t.compatible_with(&v.increase(2)));
        assert!(v.increase(2).compatible_with(&v.increase(1)));
        assert!(!v.increase(1).compatible_with(&v.increase(2)));
    }
}
