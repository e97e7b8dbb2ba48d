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
    pub fn compatible_with(&self, other: &Dewey) -> bool {
        let (a, b) = (&self.0, &other.0);
        if a.len() > b.len() {
            a[..b.len()] == b[..]
        } else if a.len() == b.len() {
            let last = a.len() - 1;
            a[..last] == b[..last] && a[last] >= b[last]
        } else {
            false
        }
    }
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
