//! A binary heap that behaves exactly as `java.util.PriorityQueue`: same
//! array layout after every operation, so iteration order and tie order match
//! Flink's (which decides which of several equal-start matches survives an
//! after-match skip).

use std::cmp::Ordering;

#[derive(Clone, Debug)]
pub struct JavaPq<T> {
    es: Vec<T>,
}

impl<T> Default for JavaPq<T> {
    fn default() -> Self {
        JavaPq { es: Vec::new() }
    }
}

pub trait PqKey {
    fn pq_cmp(&self, other: &Self) -> Ordering;
}

impl<T: PqKey> JavaPq<T> {
    pub fn new() -> Self {
        JavaPq { es: Vec::new() }
    }

    pub fn from_array(es: Vec<T>) -> Self {
        JavaPq { es }
    }

    pub fn len(&self) -> usize {
        self.es.len()
    }

    pub fn is_empty(&self) -> bool {
        self.es.is_empty()
    }

    /// Array (iteration) order.
    pub fn as_slice(&self) -> &[T] {
        &self.es
    }

    pub fn into_vec(self) -> Vec<T> {
        self.es
    }

    pub fn peek(&self) -> Option<&T> {
        self.es.first()
    }

    /// `offer`: append, then sift up while strictly smaller than the parent.
    pub fn add(&mut self, x: T) {
        self.es.push(x);
        let mut k = self.es.len() - 1;
        while k > 0 {
            let parent = (k - 1) >> 1;
            if self.es[k].pq_cmp(&self.es[parent]) != Ordering::Less {
                break;
            }
            self.es.swap(k, parent);
            k = parent;
        }
    }

    pub fn poll(&mut self) -> Option<T> {
        if self.es.is_empty() {
            return None;
        }
        let last = self.es.pop().unwrap();
        if self.es.is_empty() {
            return Some(last);
        }
        let result = std::mem::replace(&mut self.es[0], last);
        self.sift_down(0);
        Some(result)
    }

    fn sift_down(&mut self, mut k: usize) {
        let n = self.es.len();
        let half = n >> 1;
        while k < half {
            let mut child = (k << 1) + 1;
            let right = child + 1;
            if right < n && self.es[child].pq_cmp(&self.es[right]) == Ordering::Greater {
                child = right;
            }
            if self.es[k].pq_cmp(&self.es[child]) != Ordering::Greater {
                break;
            }
            self.es.swap(k, child);
            k = child;
        }
    }

    /// `removeAll`/`removeIf`: survivors keep array order, then heapify.
    /// Returns the removed elements in array order.
    pub fn remove_where(&mut self, mut pred: impl FnMut(&T) -> bool) -> Vec<T> {
        if !self.es.iter().any(&mut pred) {
            return Vec::new();
        }
        let mut removed = Vec::new();
        let mut kept = Vec::with_capacity(self.es.len());
        for e in self.es.drain(..) {
            if pred(&e) {
                removed.push(e);
            } else {
                kept.push(e);
            }
        }
        self.es = kept;
        let n = self.es.len();
        if n > 1 {
            let mut i = (n >> 1) as isize - 1;
            while i >= 0 {
                self.sift_down(i as usize);
                i -= 1;
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    impl PqKey for (u32, u32) {
        fn pq_cmp(&self, o: &Self) -> Ordering {
            self.0.cmp(&o.0)
        }
    }
    #[test]
    fn ties_follow_java_layout() {
        let mut q = JavaPq::new();
        for (i, k) in [3, 1, 1, 2, 1].iter().enumerate() {
            q.add((*k, i as u32));
        }
        // java.util.PriorityQueue gives the same sequence for these inputs.
        let order: Vec<u32> = std::iter::from_fn(|| q.poll()).map(|x| x.1).collect();
        assert_eq!(order, vec![1, 4, 2, 3, 0]);
    }
}
