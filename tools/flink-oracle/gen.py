#!/usr/bin/env python3
"""Draws random rule test cases (rule + stream, no expected result yet) over the rule-language
subset that Oracle.java maps onto Flink's Pattern API.

Usage: gen.py OUT_DIR COUNT [SEED]

The shapes follow ../../tests/conformance-random (a small alphabet: `name` in a..e, small integer
`price`), and reach a little further: deeper groups, more stage references and aggregates, equal
event times, rules Flink refuses. Where the spec deliberately differs from Flink (stage `within`
after a looping stage, after a strict negation, or on an optional stage; see docs/flink-nfa.md
section 0 in the material the project was given) no stage `within` is drawn.
"""
import json
import os
import random
import sys

NAMES = "abcde"


def pick(r, weighted):
    total = sum(w for _, w in weighted)
    x = r.uniform(0, total)
    for v, w in weighted:
        x -= w
        if x <= 0:
            return v
    return weighted[-1][0]


def literal_name(r):
    return "'%s'" % r.choice(NAMES)


def condition(r, refs, own=None):
    """A condition; `refs` are stage names it may refer to (already placed), `own` the stage itself."""
    simple = [
        lambda: "name = %s" % literal_name(r),
        lambda: "name IN (%s, %s)" % (literal_name(r), literal_name(r)),
        lambda: "price > %d" % r.randint(1, 7),
        lambda: "price <= %d" % r.randint(1, 7),
        lambda: "price BETWEEN %d AND %d" % tuple(sorted((r.randint(1, 8), r.randint(1, 8)))),
        lambda: "name <> %s" % literal_name(r),
        lambda: "name = %s AND price < %d" % (literal_name(r), r.randint(2, 8)),
        lambda: "name = %s OR price > %d" % (literal_name(r), r.randint(3, 8)),
        lambda: "NOT (name = %s)" % literal_name(r),
        lambda: "price % 2 = 0",
    ]
    cands = list(refs) + ([own] if own else [])
    if cands and r.random() < 0.35:
        s = r.choice(cands)
        shapes = [
            lambda: "name = %s AND price > %s.price" % (literal_name(r), s),
            lambda: "price >= %s.price" % s,
            lambda: "name = %s AND price = %s.price" % (literal_name(r), s),
            lambda: "name <> %s.name" % s,
            lambda: "price < %s.price + %d" % (s, r.randint(1, 3)),
            lambda: "name = %s AND SUM(%s.price) > %d" % (literal_name(r), s, r.randint(2, 10)),
            lambda: "COALESCE(SUM(%s.price), 0) + price < %d" % (s, r.randint(5, 15)),
            lambda: "name = %s AND COUNT(%s) >= %d" % (literal_name(r), s, r.randint(1, 3)),
            lambda: "name IN (%s, %s) AND COUNT(%s) < %d" % (literal_name(r), literal_name(r), s, r.randint(1, 3)),
            lambda: "name = %s AND price >= COALESCE(MAX(%s.price), 0)" % (literal_name(r), s),
            lambda: "price > AVG(%s.price)" % s,
            lambda: "name = %s AND price < FIRST(%s.price)" % (literal_name(r), s),
            lambda: "price = MIN(%s.price)" % s,
            lambda: "SUM(%s.price) < %d OR price > %d" % (s, r.randint(3, 12), r.randint(4, 8)),
            lambda: "price > COALESCE(LAST(%s.price, 1), 0)" % s,
            lambda: "name = %s AND price <> COALESCE(LAST(%s.price), 0)" % (literal_name(r), s),
            lambda: "%s.price IS NULL OR price > %s.price" % (s, s),
        ]
        return r.choice(shapes)()
    if r.random() < 0.55:
        return "name = %s" % literal_name(r)
    return r.choice(simple)()


def times(r):
    return pick(r, [
        ({"min": 1}, 18), (2, 10), ({"min": 2}, 7), ([1, 2], 5), ([1, 3], 3), ([0, 2], 3),
        ([2, 3], 2), (3, 2), ({"min": 2, "max": 3}, 2), ({"min": 2, "max": 4}, 2),
        ({"min": 1, "max": 3}, 2), ([2, 4], 2), ({"min": 1, "max": 2}, 1), ([0, 3], 1),
    ])


def unbounded(t):
    return isinstance(t, dict) and "max" not in t


def stages(r, n, first_index, prefix, refs, depth, top):
    """A list of n stages; returns (stages, names of stages that can be referenced)."""
    out = []
    placed = []
    prev = None  # what the previous stage was: dict with flags
    for i in range(n):
        idx = first_index + i
        name = "%s%s" % (prefix, idx if not prefix or depth == 0 else chr(ord("a") + i))
        st = {"name": name}
        is_first = i == 0
        if not is_first:
            st["contiguity"] = pick(r, [("relaxed", 46), ("strict", 33), ("any", 21)])
        group = depth < 2 and r.random() < (0.12 if depth == 0 else 0.05)
        if group:
            inner_n = pick(r, [(2, 8), (1, 1), (3, 2)])
            inner, inner_refs = stages(r, inner_n, 0, name if depth == 0 else name, refs + placed, depth + 1, False)
            st = {"name": "g%s" % name.lstrip("s"), "group": inner}
            if not is_first:
                st["contiguity"] = pick(r, [("relaxed", 46), ("strict", 33), ("any", 21)])
            if r.random() < 0.5:
                st["times"] = times(r)
                if r.random() < 0.3:
                    st["inner"] = r.choice(["strict", "any"])
            if (r.random() < 0.15 and not (prev and prev.get("greedy"))
                    and not (isinstance(st.get("times"), list) and st["times"][0] == 0)):
                st["optional"] = True
            out.append(st)
            placed.extend(inner_refs)
            prev = {"looping": True, "group": True}
            continue
        negate = (not is_first and r.random() < 0.1 and not (prev and (prev.get("optional") or prev.get("greedy"))))
        if negate:
            st["where"] = condition(r, refs + placed)
            st["negate"] = True
            if st.get("contiguity") == "any":
                st["contiguity"] = "relaxed"
            out.append(st)
            prev = {"negate": True, "strict_negate": st.get("contiguity") == "strict"}
            continue
        looping = r.random() < 0.4
        t = times(r) if looping else None
        st["where"] = condition(r, refs + placed, name if looping and r.random() < 0.3 else None)
        if t is not None:
            st["times"] = t
            if r.random() < 0.35:
                st["inner"] = pick(r, [("strict", 56), ("any", 44)])
            if r.random() < 0.25 and st.get("inner") != "any":
                st["greedy"] = True
            if unbounded(t) and r.random() < 0.12:
                st["until"] = "name = %s" % literal_name(r)
        # `times: [0, n]` is optional already (Flink refuses `optional` on top of it; Cepheid accepts)
        optional = (r.random() < 0.15 and not (prev and prev.get("greedy"))
                    and not (isinstance(t, list) and t[0] == 0))
        if optional:
            st["optional"] = True
        # a stage window only where Flink enforces it like the spec
        if (top and not is_first and t is None and not optional and prev is not None
                and not prev.get("looping") and not prev.get("negate") and not prev.get("optional")
                and r.random() < 0.15):
            st["within"] = r.randint(2, 15)
        out.append(st)
        placed.append(name)
        prev = {"looping": t is not None, "optional": optional, "greedy": st.get("greedy", False)}
    return out, placed


def rule(r, i):
    n = pick(r, [(1, 64), (2, 152), (3, 147), (4, 80), (5, 57)])
    pattern, placed = stages(r, n, 1, "s", [], 0, True)
    # negation last: relaxed needs a window (else Flink and Cepheid refuse; keep some of those)
    ru = {"id": "oracle_%d" % i, "version": 1, "pattern": pattern}
    if r.random() < 0.38:
        ru["within"] = r.randint(3, 20)
    last = pattern[-1]
    if last.get("negate") and last.get("contiguity", "relaxed") != "strict" and "within" not in ru and r.random() < 0.8:
        ru["within"] = r.randint(3, 20)
    for st in pattern:
        if "within" in st and "within" in ru and st["within"] > ru["within"]:
            st["within"] = ru["within"]
    am = pick(r, [("skip_past_last_event", 114), ("skip_to_next", 74), ("no_skip", 51), ("absent", 135),
                  ("skip_to_first", 60), ("skip_to_last", 66)])
    if am in ("skip_to_first", "skip_to_last"):
        # Flink refuses a skip target inside a group (Cepheid accepts it): top-level stages only
        names = [st["name"] for st in pattern if "group" not in st and not st.get("negate")]
        if names:
            ru["after_match"] = {am: r.choice(names)}
    elif am != "absent":
        ru["after_match"] = am
    if r.random() < 0.2:
        ru["emit_timeouts"] = True
    return ru


def events(r, longer):
    n = r.randint(5, 60 if longer else 30)
    t = r.choice([0, 1, 3, 10])
    out = []
    for i in range(n):
        t += pick(r, [(0, 3), (1, 4), (2, 3), (3, 2), (5, 1)])
        out.append({"id": i + 1, "name": r.choice(NAMES), "price": r.randint(1, 9), "event_time": t})
    return out


def main():
    out_dir, count = sys.argv[1], int(sys.argv[2])
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    os.makedirs(out_dir, exist_ok=True)
    for i in range(count):
        r = random.Random(seed * 1_000_003 + i)
        case = {"name": "oracle/%d/%05d" % (seed, i), "origin": "", "rule": rule(r, i), "events": events(r, seed % 2 == 0)}
        with open(os.path.join(out_dir, "oracle-%d-%05d.json" % (seed, i)), "w") as f:
            json.dump(case, f)


if __name__ == "__main__":
    main()
