// Runs rule test cases (the format of ../../tests/conformance) through Apache Flink's own CEP NFA
// and writes what Flink produced as each case's expected result. A development tool: it lets us
// compare Cepheid with Flink on rules and streams nobody wrote by hand (see README.md here).
//
// Input: case files whose rules use the subset of the rule language that maps one to one onto
// Flink's Pattern API (stages, groups, contiguity, quantifiers, greedy, inner, until, negation,
// rule and stage `within`, after-match skip, timeouts) and conditions over flat events
// (comparisons, AND/OR/NOT, IN, BETWEEN, + - * /, COALESCE, stage references and aggregates).
// Feeding: for each event advanceTime(t) then process(e, t), as Flink's NFATestHarness does, and
// advanceTime(+inf) at the end.

import java.io.File;
import java.io.IOException;
import java.io.Serializable;
import java.time.Duration;
import java.util.*;

import org.apache.flink.api.common.serialization.SerializerConfigImpl;
import org.apache.flink.api.common.state.*;
import org.apache.flink.api.java.tuple.Tuple2;
import org.apache.flink.api.java.typeutils.GenericTypeInfo;
import org.apache.flink.cep.nfa.NFA;
import org.apache.flink.cep.nfa.NFAState;
import org.apache.flink.cep.nfa.aftermatch.AfterMatchSkipStrategy;
import org.apache.flink.cep.nfa.compiler.NFACompiler;
import org.apache.flink.cep.nfa.sharedbuffer.SharedBuffer;
import org.apache.flink.cep.nfa.sharedbuffer.SharedBufferAccessor;
import org.apache.flink.cep.pattern.GroupPattern;
import org.apache.flink.cep.pattern.Pattern;
import org.apache.flink.cep.pattern.WithinType;
import org.apache.flink.cep.pattern.conditions.IterativeCondition;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.node.ArrayNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.node.ObjectNode;

public class Oracle {
    static final ObjectMapper JSON = new ObjectMapper();

    /** A case whose matches explode combinatorially is given up after this long (checked in every condition). */
    static final long CASE_BUDGET_MS = 5_000;

    static long deadline;

    static final class TooLong extends RuntimeException {}

    /** One event: its id and its fields (numbers as Long or Double, strings). */
    public static final class Ev implements Serializable {
        public long id;
        public long time;
        public HashMap<String, Object> fields = new HashMap<>();

        public Ev() {}

        @Override
        public String toString() {
            return "Ev" + id;
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: Oracle IN_DIR OUT_DIR");
            System.exit(2);
        }
        File in = new File(args[0]);
        File out = new File(args[1]);
        out.mkdirs();
        File[] files = in.listFiles((d, n) -> n.endsWith(".json"));
        Arrays.sort(files);
        int errors = 0;
        int skipped = 0;
        for (File f : files) {
            ObjectNode c = (ObjectNode) JSON.readTree(f);
            c.remove("expected");
            c.remove("expected_timeouts");
            c.remove("expected_error");
            try {
                deadline = System.currentTimeMillis() + CASE_BUDGET_MS;
                runGuarded(c);
                c.put("origin", "random case; expected results: Apache Flink 2.3 CEP (tools/flink-oracle)");
            } catch (TooLong e) {
                System.err.println(f.getName() + ": left out, over " + CASE_BUDGET_MS + " ms in Flink");
                skipped++;
                continue;
            } catch (Throwable e) {
                if (e.getCause() instanceof TooLong) {
                    System.err.println(f.getName() + ": left out, over " + CASE_BUDGET_MS + " ms in Flink");
                    skipped++;
                    continue;
                }
                // Flink refused the rule: Cepheid must refuse it too (any message)
                c.put("origin", "Flink 2.3 refused it: " + e.getClass().getSimpleName() + ": " + e.getMessage());
                c.put("expected_error", "");
                errors++;
            }
            JSON.writeValue(new File(out, f.getName()), c);
        }
        System.err.println(files.length + " cases, " + errors + " refused by Flink, " + skipped + " left out");
        System.exit(0); // the shared buffer's cache leaves a timer thread running
    }

    /**
     * Runs a case on its own thread: past the budget by far it is stopped (some rules make Flink's
     * NFA loop for ever outside any condition, where the deadline check cannot see it).
     */
    @SuppressWarnings("deprecation")
    static void runGuarded(ObjectNode c) throws Throwable {
        Throwable[] failure = new Throwable[1];
        Thread t = new Thread(() -> {
            try {
                run(c);
            } catch (Throwable e) {
                failure[0] = e;
            }
        });
        t.setDaemon(true);
        t.start();
        t.join(2 * CASE_BUDGET_MS);
        if (t.isAlive()) {
            t.stop();
            t.join(1000);
            throw new TooLong();
        }
        if (failure[0] != null) {
            throw failure[0];
        }
    }

    static void run(ObjectNode c) throws Exception {
        JsonNode rule = c.get("rule");
        Set<String> stageNames = new HashSet<>();
        collectNames(rule.get("pattern"), stageNames);
        AfterMatchSkipStrategy skip = skipStrategy(rule.get("after_match"));
        Pattern<Ev, Ev> pattern = build(rule.get("pattern"), skip, stageNames);
        if (rule.has("within")) {
            pattern = pattern.within(Duration.ofMillis(rule.get("within").asLong()));
        }
        boolean timeouts = rule.has("emit_timeouts") && rule.get("emit_timeouts").asBoolean();
        NFA<Ev> nfa = NFACompiler.compileFactory(pattern, timeouts).createNFA();
        SharedBuffer<Ev> buffer =
                new SharedBuffer<>(
                        new MemoryStateStore(),
                        new GenericTypeInfo<>(Ev.class).createSerializer(new SerializerConfigImpl()));
        NFAState state = nfa.createInitialNFAState();
        ArrayNode expected = JSON.createArrayNode();
        ArrayNode expectedTimeouts = JSON.createArrayNode();
        for (JsonNode e : c.get("events")) {
            Ev ev = new Ev();
            ev.id = e.get("id").asLong();
            ev.time = e.get("event_time").asLong();
            Iterator<Map.Entry<String, JsonNode>> it = e.fields();
            while (it.hasNext()) {
                Map.Entry<String, JsonNode> f = it.next();
                JsonNode v = f.getValue();
                Object value =
                        v.isIntegralNumber()
                                ? (Object) v.asLong()
                                : v.isNumber() ? (Object) v.asDouble() : v.isNull() ? null : v.asText();
                ev.fields.put(f.getKey(), value);
            }
            try (SharedBufferAccessor<Ev> acc = buffer.getAccessor()) {
                Tuple2<Collection<Map<String, List<Ev>>>, Collection<Tuple2<Map<String, List<Ev>>, Long>>> t =
                        nfa.advanceTime(acc, state, ev.time, skip);
                add(expected, t.f0);
                for (Tuple2<Map<String, List<Ev>>, Long> to : t.f1) {
                    expectedTimeouts.add(toJson(to.f0));
                }
                add(expected, nfa.process(acc, state, ev, ev.time, skip, () -> 0L));
            }
        }
        try (SharedBufferAccessor<Ev> acc = buffer.getAccessor()) {
            Tuple2<Collection<Map<String, List<Ev>>>, Collection<Tuple2<Map<String, List<Ev>>, Long>>> t =
                    nfa.advanceTime(acc, state, Long.MAX_VALUE, skip);
            add(expected, t.f0);
            for (Tuple2<Map<String, List<Ev>>, Long> to : t.f1) {
                expectedTimeouts.add(toJson(to.f0));
            }
        }
        c.set("expected", expected);
        if (timeouts) {
            c.set("expected_timeouts", expectedTimeouts);
        }
    }

    /** Adds one step's matches; a match identical to one already emitted in the step is kept once (the spec's rule, not Flink's). */
    static void add(ArrayNode out, Collection<Map<String, List<Ev>>> matches) {
        Set<String> seen = new HashSet<>();
        for (Map<String, List<Ev>> m : matches) {
            ObjectNode j = toJson(m);
            if (seen.add(j.toString())) {
                out.add(j);
            }
        }
    }

    static ObjectNode toJson(Map<String, List<Ev>> m) {
        ObjectNode j = JSON.createObjectNode();
        for (Map.Entry<String, List<Ev>> e : new TreeMap<>(m).entrySet()) {
            ArrayNode ids = j.putArray(e.getKey());
            for (Ev ev : e.getValue()) {
                ids.add(ev.id);
            }
        }
        return j;
    }

    static void collectNames(JsonNode stages, Set<String> names) {
        for (JsonNode s : stages) {
            names.add(s.get("name").asText());
            if (s.has("group")) {
                collectNames(s.get("group"), names);
            }
        }
    }

    static AfterMatchSkipStrategy skipStrategy(JsonNode n) {
        if (n == null || n.isNull()) {
            return AfterMatchSkipStrategy.noSkip();
        }
        if (n.isTextual()) {
            switch (n.asText()) {
                case "no_skip":
                    return AfterMatchSkipStrategy.noSkip();
                case "skip_to_next":
                    return AfterMatchSkipStrategy.skipToNext();
                case "skip_past_last_event":
                    return AfterMatchSkipStrategy.skipPastLastEvent();
                default:
                    throw new IllegalArgumentException("after_match " + n);
            }
        }
        if (n.has("skip_to_first")) {
            return AfterMatchSkipStrategy.skipToFirst(n.get("skip_to_first").asText());
        }
        if (n.has("skip_to_last")) {
            return AfterMatchSkipStrategy.skipToLast(n.get("skip_to_last").asText());
        }
        throw new IllegalArgumentException("after_match " + n);
    }

    /** Builds a stage sequence; `skip` is given for the outermost sequence only. */
    @SuppressWarnings({"unchecked", "rawtypes"})
    static Pattern<Ev, Ev> build(JsonNode stages, AfterMatchSkipStrategy skip, Set<String> names) {
        Pattern<Ev, Ev> p = null;
        for (JsonNode s : stages) {
            String name = s.get("name").asText();
            String contiguity = s.has("contiguity") ? s.get("contiguity").asText() : "relaxed";
            boolean negate = s.has("negate") && s.get("negate").asBoolean();
            if (s.has("group")) {
                Pattern<Ev, Ev> inner = build(s.get("group"), null, names);
                if (p == null) {
                    p = skip == null ? (Pattern) Pattern.begin(inner) : (Pattern) Pattern.begin(inner, skip);
                } else if (contiguity.equals("strict")) {
                    p = (Pattern) p.next(inner);
                } else if (contiguity.equals("any")) {
                    p = (Pattern) p.followedByAny(inner);
                } else {
                    p = (Pattern) p.followedBy(inner);
                }
            } else if (p == null) {
                p = skip == null ? Pattern.begin(name) : Pattern.begin(name, skip);
            } else if (negate) {
                p = contiguity.equals("strict") ? p.notNext(name) : p.notFollowedBy(name);
            } else if (contiguity.equals("strict")) {
                p = p.next(name);
            } else if (contiguity.equals("any")) {
                p = p.followedByAny(name);
            } else {
                p = p.followedBy(name);
            }
            if (!s.has("group")) {
                p = p.where(condition(s.has("where") ? s.get("where").asText() : "TRUE", names));
            }
            boolean optional = s.has("optional") && s.get("optional").asBoolean();
            JsonNode times = s.get("times");
            boolean looping = false;
            if (times != null) {
                if (times.isInt()) {
                    p = p.times(times.asInt());
                } else if (times.isArray()) {
                    int min = times.get(0).asInt();
                    int max = times.get(1).asInt();
                    p = p.times(min, max); // Flink reads a minimum of 0 as optional itself
                } else if (times.has("max")) {
                    p = p.times(times.get("min").asInt(), times.get("max").asInt());
                } else {
                    int min = times.get("min").asInt();
                    p = min == 1 ? p.oneOrMore() : p.timesOrMore(min);
                }
                looping = true;
            }
            if (optional) {
                p = p.optional();
            }
            if (s.has("greedy") && s.get("greedy").asBoolean()) {
                p = p.greedy();
            }
            if (s.has("inner") && looping) {
                String inner = s.get("inner").asText();
                if (inner.equals("strict")) {
                    p = p.consecutive();
                } else if (inner.equals("any")) {
                    p = p.allowCombinations();
                }
            }
            if (s.has("until")) {
                p = p.until(condition(s.get("until").asText(), names));
            }
            if (s.has("within")) {
                p = p.within(Duration.ofMillis(s.get("within").asLong()), WithinType.PREVIOUS_AND_CURRENT);
            }
        }
        return p;
    }

    static IterativeCondition<Ev> condition(String text, Set<String> names) {
        Expr e = new Parser(text, names).parseAll();
        return new IterativeCondition<Ev>() {
            @Override
            public boolean filter(Ev value, Context<Ev> ctx) throws Exception {
                if (System.currentTimeMillis() > deadline) {
                    throw new TooLong();
                }
                return Boolean.TRUE.equals(e.eval(value, ctx));
            }
        };
    }

    // ---- conditions: a small SQL expression evaluator with three-valued logic ----

    interface Expr extends Serializable {
        Object eval(Ev e, IterativeCondition.Context<Ev> ctx) throws Exception;
    }

    static final class Parser {
        final List<String> toks = new ArrayList<>();
        final Set<String> names;
        final String text;
        int pos;

        Parser(String text, Set<String> names) {
            this.text = text;
            this.names = names;
            int i = 0;
            while (i < text.length()) {
                char ch = text.charAt(i);
                if (Character.isWhitespace(ch)) {
                    i++;
                } else if (ch == '\'') {
                    StringBuilder sb = new StringBuilder("'");
                    i++;
                    while (true) {
                        char d = text.charAt(i++);
                        if (d == '\'') {
                            if (i < text.length() && text.charAt(i) == '\'') {
                                sb.append('\'');
                                i++;
                            } else {
                                break;
                            }
                        } else {
                            sb.append(d);
                        }
                    }
                    toks.add(sb.toString());
                } else if (Character.isDigit(ch)) {
                    int j = i;
                    while (j < text.length() && (Character.isDigit(text.charAt(j)) || text.charAt(j) == '.')) j++;
                    toks.add(text.substring(i, j));
                    i = j;
                } else if (Character.isLetter(ch) || ch == '_') {
                    int j = i;
                    while (j < text.length()
                            && (Character.isLetterOrDigit(text.charAt(j)) || text.charAt(j) == '_' || text.charAt(j) == '.')) j++;
                    toks.add(text.substring(i, j));
                    i = j;
                } else if (text.startsWith("<>", i) || text.startsWith("<=", i) || text.startsWith(">=", i) || text.startsWith("!=", i)) {
                    toks.add(text.substring(i, i + 2));
                    i += 2;
                } else {
                    toks.add(String.valueOf(ch));
                    i++;
                }
            }
        }

        String peek() {
            return pos < toks.size() ? toks.get(pos) : "";
        }

        boolean eatKw(String kw) {
            if (peek().equalsIgnoreCase(kw)) {
                pos++;
                return true;
            }
            return false;
        }

        void expect(String t) {
            if (!peek().equalsIgnoreCase(t)) {
                throw new IllegalArgumentException("expected " + t + " at token " + pos + " in: " + text);
            }
            pos++;
        }

        Expr parseAll() {
            Expr e = or();
            if (pos != toks.size()) {
                throw new IllegalArgumentException("trailing input at token " + pos + " in: " + text);
            }
            return e;
        }

        Expr or() {
            return junction("OR", this::and, true);
        }

        Expr and() {
            return junction("AND", this::not, false);
        }

        /** `next (kw next)*`: OR when `decides` is true (TRUE decides it), AND when false. */
        Expr junction(String kw, java.util.function.Supplier<Expr> next, boolean decides) {
            Expr l = next.get();
            while (eatKw(kw)) {
                Expr a = l, b = next.get();
                l = (ev, ctx) -> {
                    Object x = a.eval(ev, ctx), y = b.eval(ev, ctx);
                    if (Boolean.valueOf(decides).equals(x) || Boolean.valueOf(decides).equals(y)) return decides;
                    if (x == null || y == null) return null;
                    return !decides;
                };
            }
            return l;
        }

        Expr not() {
            if (eatKw("NOT")) {
                Expr a = not();
                return (ev, ctx) -> {
                    Object x = a.eval(ev, ctx);
                    return x == null ? null : !((Boolean) x);
                };
            }
            return cmp();
        }

        Expr cmp() {
            Expr l = add();
            String op = peek();
            if (op.equals("=") || op.equals("<>") || op.equals("!=") || op.equals("<") || op.equals("<=") || op.equals(">") || op.equals(">=")) {
                pos++;
                Expr r = add();
                return (ev, ctx) -> {
                    Integer c = compare(l.eval(ev, ctx), r.eval(ev, ctx));
                    if (c == null) return null;
                    switch (op) {
                        case "=": return c == 0;
                        case "<>": case "!=": return c != 0;
                        case "<": return c < 0;
                        case "<=": return c <= 0;
                        case ">": return c > 0;
                        default: return c >= 0;
                    }
                };
            }
            boolean negated = false;
            if (peek().equalsIgnoreCase("NOT")) {
                negated = true;
                pos++;
            }
            if (eatKw("BETWEEN")) {
                Expr lo = add();
                expect("AND");
                Expr hi = add();
                boolean neg = negated;
                return (ev, ctx) -> {
                    Object v = l.eval(ev, ctx);
                    Integer a = compare(v, lo.eval(ev, ctx)), b = compare(v, hi.eval(ev, ctx));
                    Boolean r;
                    if (a == null || b == null) {
                        if ((a != null && a < 0) || (b != null && b > 0)) r = false; else r = null;
                    } else r = a >= 0 && b <= 0;
                    return r == null ? null : neg != r;
                };
            }
            if (eatKw("IN")) {
                expect("(");
                List<Expr> items = new ArrayList<>();
                items.add(add());
                while (peek().equals(",")) {
                    pos++;
                    items.add(add());
                }
                expect(")");
                boolean neg = negated;
                return (ev, ctx) -> {
                    Object v = l.eval(ev, ctx);
                    boolean sawNull = false;
                    for (Expr i : items) {
                        Integer c = compare(v, i.eval(ev, ctx));
                        if (c == null) sawNull = true;
                        else if (c == 0) return !neg;
                    }
                    return sawNull ? null : neg;
                };
            }
            if (negated) throw new IllegalArgumentException("NOT without BETWEEN/IN in: " + text);
            if (eatKw("IS")) {
                boolean neg = eatKw("NOT");
                expect("NULL");
                return (ev, ctx) -> (l.eval(ev, ctx) == null) != neg;
            }
            return l;
        }

        Expr add() {
            Expr l = mul();
            while (peek().equals("+") || peek().equals("-")) {
                String op = toks.get(pos++);
                Expr a = l, b = mul();
                l = (ev, ctx) -> arith(op, a.eval(ev, ctx), b.eval(ev, ctx));
            }
            return l;
        }

        Expr mul() {
            Expr l = primary();
            while (peek().equals("*") || peek().equals("/") || peek().equals("%")) {
                String op = toks.get(pos++);
                Expr a = l, b = primary();
                l = (ev, ctx) -> arith(op, a.eval(ev, ctx), b.eval(ev, ctx));
            }
            return l;
        }

        Expr primary() {
            String t = toks.get(pos++);
            if (t.equals("(")) {
                Expr e = or();
                expect(")");
                return e;
            }
            if (t.equals("-")) {
                Expr a = primary();
                return (ev, ctx) -> arith("-", 0L, a.eval(ev, ctx));
            }
            if (t.startsWith("'")) {
                String s = t.substring(1);
                return (ev, ctx) -> s;
            }
            if (Character.isDigit(t.charAt(0))) {
                Object n = t.contains(".") ? (Object) Double.parseDouble(t) : (Object) Long.parseLong(t);
                return (ev, ctx) -> n;
            }
            String up = t.toUpperCase(Locale.ROOT);
            if (up.equals("TRUE")) return (ev, ctx) -> true;
            if (up.equals("FALSE")) return (ev, ctx) -> false;
            if (up.equals("NULL")) return (ev, ctx) -> null;
            if (peek().equals("(")) {
                pos++;
                return function(up);
            }
            int dot = t.indexOf('.');
            if (dot > 0 && names.contains(t.substring(0, dot))) {
                String stage = t.substring(0, dot), field = t.substring(dot + 1);
                return (ev, ctx) -> {
                    Object last = null;
                    for (Ev x : ctx.getEventsForPattern(stage)) last = x.fields.get(field);
                    return last;
                };
            }
            return (ev, ctx) -> ev.fields.get(t);
        }

        Expr function(String f) {
            if (f.equals("COALESCE")) {
                List<Expr> args = new ArrayList<>();
                args.add(or());
                while (peek().equals(",")) {
                    pos++;
                    args.add(or());
                }
                expect(")");
                return (ev, ctx) -> {
                    for (Expr a : args) {
                        Object v = a.eval(ev, ctx);
                        if (v != null) return v;
                    }
                    return null;
                };
            }
            if (f.equals("ABS")) {
                Expr a = or();
                expect(")");
                return (ev, ctx) -> {
                    Object v = a.eval(ev, ctx);
                    if (v instanceof Long) return Math.abs((Long) v);
                    if (v instanceof Double) return Math.abs((Double) v);
                    return null;
                };
            }
            // aggregates over a stage: COUNT(stage) or F(stage.field [, n])
            String arg = toks.get(pos++);
            int back = 0;
            if (peek().equals(",")) {
                pos++;
                back = Integer.parseInt(toks.get(pos++));
            }
            expect(")");
            int dot = arg.indexOf('.');
            String stage = dot > 0 ? arg.substring(0, dot) : arg;
            String field = dot > 0 ? arg.substring(dot + 1) : null;
            if (!names.contains(stage)) throw new IllegalArgumentException("unknown stage " + stage + " in: " + text);
            int n = back;
            return (ev, ctx) -> {
                List<Object> vals = new ArrayList<>();
                int count = 0;
                for (Ev x : ctx.getEventsForPattern(stage)) {
                    count++;
                    if (field != null) vals.add(x.fields.get(field));
                }
                switch (f) {
                    case "COUNT": return (long) count;
                    case "FIRST": return vals.isEmpty() ? null : vals.get(0);
                    case "LAST": return vals.size() <= n ? null : vals.get(vals.size() - 1 - n);
                    default:
                }
                Object acc = null;
                long k = 0;
                for (Object v : vals) {
                    if (v == null) continue;
                    k++;
                    if (acc == null) acc = v;
                    else if (f.equals("SUM") || f.equals("AVG")) acc = arith("+", acc, v);
                    else if (f.equals("MIN")) acc = compare(v, acc) < 0 ? v : acc;
                    else if (f.equals("MAX")) acc = compare(v, acc) > 0 ? v : acc;
                }
                if (f.equals("AVG") && acc != null) return ((Number) acc).doubleValue() / k;
                return acc;
            };
        }
    }

    static Integer compare(Object a, Object b) {
        if (a == null || b == null) return null;
        if (a instanceof Number && b instanceof Number) {
            if (a instanceof Long && b instanceof Long) return Long.compare((Long) a, (Long) b);
            return Double.compare(((Number) a).doubleValue(), ((Number) b).doubleValue());
        }
        if (a instanceof String && b instanceof String) return Integer.signum(((String) a).compareTo((String) b));
        if (a instanceof Boolean && b instanceof Boolean) return Boolean.compare((Boolean) a, (Boolean) b);
        return null;
    }

    static Object arith(String op, Object a, Object b) {
        if (!(a instanceof Number) || !(b instanceof Number)) return null;
        boolean ints = a instanceof Long && b instanceof Long; // integer op integer stays an integer
        double x = ((Number) a).doubleValue(), y = ((Number) b).doubleValue();
        long p = ((Number) a).longValue(), q = ((Number) b).longValue();
        if ((op.equals("/") || op.equals("%")) && y == 0) return null;
        return switch (op) {
            case "+" -> ints ? (Object) (p + q) : (Object) (x + y);
            case "-" -> ints ? (Object) (p - q) : (Object) (x - y);
            case "*" -> ints ? (Object) (p * q) : (Object) (x * y);
            case "/" -> ints ? (Object) (p / q) : (Object) (x / y);
            default -> ints ? (Object) (p % q) : (Object) (x % y);
        };
    }

    // ---- keyed state in plain Java maps (one key), enough for SharedBuffer ----

    static final class MemoryStateStore implements KeyedStateStore {
        @Override
        public <T> ValueState<T> getState(ValueStateDescriptor<T> d) {
            return new ValueState<T>() {
                T value;

                public T value() {
                    return value;
                }

                public void update(T v) {
                    value = v;
                }

                public void clear() {
                    value = null;
                }
            };
        }

        @Override
        public <UK, UV> MapState<UK, UV> getMapState(MapStateDescriptor<UK, UV> d) {
            return new MapState<UK, UV>() {
                final HashMap<UK, UV> m = new HashMap<>();

                public UV get(UK k) {
                    return m.get(k);
                }

                public void put(UK k, UV v) {
                    m.put(k, v);
                }

                public void putAll(Map<UK, UV> all) {
                    m.putAll(all);
                }

                public void remove(UK k) {
                    m.remove(k);
                }

                public boolean contains(UK k) {
                    return m.containsKey(k);
                }

                public Iterable<Map.Entry<UK, UV>> entries() {
                    return m.entrySet();
                }

                public Iterable<UK> keys() {
                    return m.keySet();
                }

                public Iterable<UV> values() {
                    return m.values();
                }

                public Iterator<Map.Entry<UK, UV>> iterator() {
                    return m.entrySet().iterator();
                }

                public boolean isEmpty() {
                    return m.isEmpty();
                }

                public void clear() {
                    m.clear();
                }
            };
        }

        @Override
        public <T> ListState<T> getListState(ListStateDescriptor<T> d) {
            throw new UnsupportedOperationException();
        }

        @Override
        public <T> ReducingState<T> getReducingState(ReducingStateDescriptor<T> d) {
            throw new UnsupportedOperationException();
        }

        @Override
        public <IN, ACC, OUT> AggregatingState<IN, OUT> getAggregatingState(AggregatingStateDescriptor<IN, ACC, OUT> d) {
            throw new UnsupportedOperationException();
        }

        @Override
        public <T> org.apache.flink.api.common.state.v2.ValueState<T> getValueState(
                org.apache.flink.api.common.state.v2.ValueStateDescriptor<T> d) {
            throw new UnsupportedOperationException();
        }

        @Override
        public <T> org.apache.flink.api.common.state.v2.ListState<T> getListState(
                org.apache.flink.api.common.state.v2.ListStateDescriptor<T> d) {
            throw new UnsupportedOperationException();
        }

        @Override
        public <UK, UV> org.apache.flink.api.common.state.v2.MapState<UK, UV> getMapState(
                org.apache.flink.api.common.state.v2.MapStateDescriptor<UK, UV> d) {
            throw new UnsupportedOperationException();
        }

        @Override
        public <T> org.apache.flink.api.common.state.v2.ReducingState<T> getReducingState(
                org.apache.flink.api.common.state.v2.ReducingStateDescriptor<T> d) {
            throw new UnsupportedOperationException();
        }

        @Override
        public <IN, ACC, OUT> org.apache.flink.api.common.state.v2.AggregatingState<IN, OUT> getAggregatingState(
                org.apache.flink.api.common.state.v2.AggregatingStateDescriptor<IN, ACC, OUT> d) {
            throw new UnsupportedOperationException();
        }

        @Override
        public String getBackendTypeIdentifier() {
            return "memory";
        }
    }
}
