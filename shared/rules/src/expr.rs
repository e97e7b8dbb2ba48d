//! SQL conditions: compiled once from `sqlparser`'s AST into [`Expr`] trees
//! that read field slots and aggregate slots by index.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use cepheid_types::{Event, FieldRegistry, Value};
use sqlparser::ast::{
    self as ast, BinaryOperator, CeilFloorKind, FunctionArg, FunctionArgExpr, FunctionArguments,
    ObjectNamePart, Spanned, UnaryOperator,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::Token;

use crate::agg::{AggKind, AggSpec};
use crate::diag::Diagnostic;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Func {
    Lower,
    Upper,
    Length,
    Abs,
    Round,
    Floor,
    Ceil,
    Coalesce,
    StartsWith,
    Contains,
}

/// A compiled expression.
#[derive(Clone, Debug)]
pub enum Expr {
    Lit(Value),
    /// A field of the event under test.
    Field(cepheid_types::FieldId),
    /// The event's time in milliseconds.
    EventTime,
    /// An aggregate slot of the partial match (stage references included).
    Agg(u32),
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Cmp(CmpOp, Box<Expr>, Box<Expr>),
    Arith(ArithOp, Box<Expr>, Box<Expr>),
    Neg(Box<Expr>),
    Concat(Box<Expr>, Box<Expr>),
    InList { expr: Box<Expr>, list: Vec<Expr>, negated: bool },
    Between { expr: Box<Expr>, low: Box<Expr>, high: Box<Expr>, negated: bool },
    Like { expr: Box<Expr>, pattern: Box<Expr>, negated: bool },
    IsNull { expr: Box<Expr>, negated: bool },
    Case { operand: Option<Box<Expr>>, whens: Vec<(Expr, Expr)>, otherwise: Option<Box<Expr>> },
    Call(Func, Vec<Expr>),
}

/// What an expression reads besides the event under test.
pub trait EvalCtx {
    fn event(&self) -> &Event;
    /// Current value of aggregate slot `id` for the partial match under test.
    fn agg(&self, id: u32) -> Value;
}

/// A context with no partial match: every aggregate is NULL (COUNT 0 is
/// handled by the caller's slots; filters cannot reference stages).
pub struct NoStages<'a>(pub &'a Event);

impl EvalCtx for NoStages<'_> {
    fn event(&self) -> &Event {
        self.0
    }
    fn agg(&self, _id: u32) -> Value {
        Value::Null
    }
}

impl Expr {
    /// Does this expression read stage aggregates (history-dependent)?
    pub fn reads_stages(&self) -> bool {
        let mut found = false;
        self.walk(&mut |e| {
            if matches!(e, Expr::Agg(_)) {
                found = true;
            }
        });
        found
    }

    fn walk(&self, f: &mut dyn FnMut(&Expr)) {
        f(self);
        match self {
            Expr::Lit(_) | Expr::Field(_) | Expr::EventTime | Expr::Agg(_) => {}
            Expr::Not(e) | Expr::Neg(e) => e.walk(f),
            Expr::IsNull { expr, .. } => expr.walk(f),
            Expr::And(v) | Expr::Or(v) | Expr::Call(_, v) => v.iter().for_each(|e| e.walk(f)),
            Expr::Cmp(_, a, b) | Expr::Arith(_, a, b) | Expr::Concat(a, b) => {
                a.walk(f);
                b.walk(f)
            }
            Expr::InList { expr, list, .. } => {
                expr.walk(f);
                list.iter().for_each(|e| e.walk(f))
            }
            Expr::Between { expr, low, high, .. } => {
                expr.walk(f);
                low.walk(f);
                high.walk(f)
            }
            Expr::Like { expr, pattern, .. } => {
                expr.walk(f);
                pattern.walk(f)
            }
            Expr::Case { operand, whens, otherwise } => {
                if let Some(o) = operand {
                    o.walk(f)
                }
                for (w, t) in whens {
                    w.walk(f);
                    t.walk(f)
                }
                if let Some(o) = otherwise {
                    o.walk(f)
                }
            }
        }
    }

    /// Evaluates to a SQL value.
    pub fn eval<C: EvalCtx + ?Sized>(&self, cx: &C) -> Value {
        match self {
            Expr::Lit(v) => v.clone(),
            Expr::Field(id) => cx.event().get(*id).clone(),
            Expr::EventTime => Value::Int(cx.event().time()),
            Expr::Agg(id) => cx.agg(*id),
            Expr::Not(e) => match e.eval(cx) {
                Value::Bool(b) => Value::Bool(!b),
                _ => Value::Null,
            },
            Expr::And(list) => {
                let mut null = false;
                for e in list {
                    match e.eval(cx) {
                        Value::Bool(false) => return Value::Bool(false),
                        Value::Bool(true) => {}
                        _ => null = true,
                    }
                }
                if null {
                    Value::Null
                } else {
                    Value::Bool(true)
                }
            }
            Expr::Or(list) => {
                let mut null = false;
                for e in list {
                    match e.eval(cx) {
                        Value::Bool(true) => return Value::Bool(true),
                        Value::Bool(false) => {}
                        _ => null = true,
                    }
                }
                if null {
                    Value::Null
                } else {
                    Value::Bool(false)
                }
            }
            Expr::Cmp(op, a, b) => {
                let (a, b) = (a.eval(cx), b.eval(cx));
                match a.sql_cmp(&b) {
                    None => Value::Null,
                    Some(o) => Value::Bool(match op {
                        CmpOp::Eq => o == Ordering::Equal,
                        CmpOp::Ne => o != Ordering::Equal,
                        CmpOp::Lt => o == Ordering::Less,
                        CmpOp::Le => o != Ordering::Greater,
                        CmpOp::Gt => o == Ordering::Greater,
                        CmpOp::Ge => o != Ordering::Less,
                    }),
                }
            }
            Expr::Arith(op, a, b) => arith(*op, &a.eval(cx), &b.eval(cx)),
            Expr::Neg(e) => match e.eval(cx) {
                Value::Int(i) => i.checked_neg().map(Value::Int).unwrap_or(Value::Null),
                Value::Float(f) => Value::Float(-f),
                _ => Value::Null,
            },
            Expr::Concat(a, b) => match (a.eval(cx), b.eval(cx)) {
                (Value::Null, _) | (_, Value::Null) => Value::Null,
                (a, b) => Value::Str(Arc::from(format!("{a}{b}").as_str())),
            },
            Expr::InList { expr, list, negated } => {
                let v = expr.eval(cx);
                if v.is_null() {
                    return Value::Null;
                }
                let mut null = false;
                for item in list {
                    match v.sql_eq(&item.eval(cx)) {
                        Some(true) => return Value::Bool(!negated),
                        Some(false) => {}
                        None => null = true,
                    }
                }
                if null {
                    Value::Null
                } else {
                    Value::Bool(*negated)
                }
            }
            Expr::Between { expr, low, high, negated } => {
                let v = expr.eval(cx);
                let lo = v.sql_cmp(&low.eval(cx)).map(|o| o != Ordering::Less);
                let hi = v.sql_cmp(&high.eval(cx)).map(|o| o != Ordering::Greater);
                let r = match (lo, hi) {
                    (Some(false), _) | (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                };
                match r {
                    Some(b) => Value::Bool(b != *negated),
                    None => Value::Null,
                }
            }
            Expr::Like { expr, pattern, negated } => match (expr.eval(cx), pattern.eval(cx)) {
                (Value::Str(s), Value::Str(p)) => Value::Bool(like(&s, &p) != *negated),
                _ => Value::Null,
            },
            Expr::IsNull { expr, negated } => Value::Bool(expr.eval(cx).is_null() != *negated),
            Expr::Case { operand, whens, otherwise } => {
                let op = operand.as_ref().map(|o| o.eval(cx));
                for (w, t) in whens {
                    let hit = match &op {
                        Some(v) => v.sql_eq(&w.eval(cx)) == Some(true),
                        None => w.eval(cx).is_true(),
                    };
                    if hit {
                        return t.eval(cx);
                    }
                }
                otherwise.as_ref().map(|o| o.eval(cx)).unwrap_or(Value::Null)
            }
            Expr::Call(f, args) => call(*f, args, cx),
        }
    }

    /// Evaluates as a condition: only TRUE holds.
    #[inline]
    pub fn holds<C: EvalCtx + ?Sized>(&self, cx: &C) -> bool {
        self.eval(cx).is_true()
    }
}

fn arith(op: ArithOp, a: &Value, b: &Value) -> Value {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => {
            let r = match op {
                ArithOp::Add => x.checked_add(*y),
                ArithOp::Sub => x.checked_sub(*y),
                ArithOp::Mul => x.checked_mul(*y),
                ArithOp::Div => {
                    if *y == 0 {
                        None
                    } else {
                        x.checked_div(*y)
                    }
                }
                ArithOp::Mod => {
                    if *y == 0 {
                        None
                    } else {
                        x.checked_rem(*y)
                    }
                }
            };
            match r {
                Some(v) => Value::Int(v),
                None if *y == 0 && matches!(op, ArithOp::Div | ArithOp::Mod) => Value::Null,
                None => arith(op, &Value::Float(*x as f64), &Value::Float(*y as f64)),
            }
        }
        _ => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => match op {
                ArithOp::Add => Value::Float(x + y),
                ArithOp::Sub => Value::Float(x - y),
                ArithOp::Mul => Value::Float(x * y),
                ArithOp::Div if y == 0.0 => Value::Null,
                ArithOp::Div => Value::Float(x / y),
                ArithOp::Mod if y == 0.0 => Value::Null,
                ArithOp::Mod => Value::Float(x % y),
            },
            _ => Value::Null,
        },
    }
}

/// SQL LIKE with `%` (any run) and `_` (one character).
pub(crate) fn like(s: &str, p: &str) -> bool {
    let s: Vec<char> = s.chars().collect();
    let p: Vec<char> = p.chars().collect();
    let (mut si, mut pi) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '_' || p[pi] == s[si]) {
            si += 1;
            pi += 1;
        } else if pi < p.len() && p[pi] == '%' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '%' {
        pi += 1;
    }
    pi == p.len()
}

fn call<C: EvalCtx + ?Sized>(f: Func, args: &[Expr], cx: &C) -> Value {
    let arg = |i: usize| args.get(i).map(|a| a.eval(cx)).unwrap_or(Value::Null);
    match f {
        Func::Coalesce => {
            for a in args {
                let v = a.eval(cx);
                if !v.is_null() {
                    return v;
                }
            }
            Value::Null
        }
        Func::Lower => match arg(0) {
            Value::Str(s) => Value::str(&s.to_lowercase()),
            _ => Value::Null,
        },
        Func::Upper => match arg(0) {
            Value::Str(s) => Value::str(&s.to_uppercase()),
            _ => Value::Null,
        },
        Func::Length => match arg(0) {
            Value::Str(s) => Value::Int(s.chars().count() as i64),
            _ => Value::Null,
        },
        Func::Abs => match arg(0) {
            Value::Int(i) => i.checked_abs().map(Value::Int).unwrap_or(Value::Null),
            Value::Float(x) => Value::Float(x.abs()),
            _ => Value::Null,
        },
        Func::Round => {
            let digits = match args.get(1).map(|a| a.eval(cx)) {
                None => 0,
                Some(Value::Int(d)) => d,
                Some(_) => return Value::Null,
            };
            match arg(0) {
                Value::Int(i) => Value::Int(i),
                Value::Float(x) => {
                    let m = 10f64.powi(digits as i32);
                    Value::Float((x * m).round() / m)
                }
                _ => Value::Null,
            }
        }
        Func::Floor => match arg(0) {
            Value::Int(i) => Value::Int(i),
            Value::Float(x) => Value::Float(x.floor()),
            _ => Value::Null,
        },
        Func::Ceil => match arg(0) {
            Value::Int(i) => Value::Int(i),
            Value::Float(x) => Value::Float(x.ceil()),
            _ => Value::Null,
        },
        Func::StartsWith => match (arg(0), arg(1)) {
            (Value::Str(s), Value::Str(p)) => Value::Bool(s.starts_with(p.as_ref())),
            _ => Value::Null,
        },
        Func::Contains => match (arg(0), arg(1)) {
            (Value::Str(s), Value::Str(p)) => Value::Bool(s.contains(p.as_ref())),
            _ => Value::Null,
        },
    }
}

/// Names a condition may use, and where compiled references go.
pub(crate) struct Scope<'a> {
    pub registry: &'a mut FieldRegistry,
    /// Leaf stage name → leaf index.
    pub leaves: &'a HashMap<String, u16>,
    /// Group and `all` stage names: cannot be referenced.
    pub containers: &'a HashMap<String, &'static str>,
    pub aggs: &'a mut Vec<AggSpec>,
    /// Whether stage references are allowed (not in `filter`).
    pub stages_allowed: bool,
    /// Field paths the condition reads (for the "stage name equals a field" check).
    pub fields_read: &'a mut Vec<String>,
}

impl Scope<'_> {
    fn agg(&mut self, spec: AggSpec) -> u32 {
        if let Some(i) = self.aggs.iter().position(|a| *a == spec) {
            return i as u32;
        }
        self.aggs.push(spec);
        (self.aggs.len() - 1) as u32
    }
}

/// Parses and compiles one condition. Errors carry SQL positions.
pub(crate) fn compile_condition(text: &str, scope: &mut Scope) -> Result<Expr, Vec<Diagnostic>> {
    let dialect = GenericDialect {};
    let parsed = Parser::new(&dialect).try_with_sql(text).and_then(|mut p| {
        let e = p.parse_expr()?;
        let next = p.peek_token();
        if next.token != Token::EOF {
            return Err(sqlparser::parser::ParserError::ParserError(format!(
                "unexpected `{}` after the end of the condition at Line: {}, Column: {}",
                next.token, next.span.start.line, next.span.start.column
            )));
        }
        Ok(e)
    });
    let ast = match parsed {
        Ok(a) => a,
        Err(e) => {
            let msg = e.to_string();
            let (mut l, mut c) = parse_position(&msg);
            if l == 0 {
                // Errors at the end of the text carry no position: point past the last character.
                l = text.lines().count().max(1) as u64;
                c = text.lines().last().map(|x| x.chars().count()).unwrap_or(0) as u64 + 1;
            }
            let clean = msg
                .trim_start_matches("sql parser error: ")
                .split(" at Line: ")
                .next()
                .unwrap_or(&msg)
                .to_string();
            return Err(vec![Diagnostic::new("E100", format!("condition does not parse: {clean}")).at(l, c)]);
        }
    };
    let mut diags = Vec::new();
    let e = Compiler { scope, diags: &mut diags }.expr(&ast);
    if diags.is_empty() {
        Ok(e)
    } else {
        Err(diags)
    }
}

fn parse_position(msg: &str) -> (u64, u64) {
    let line = msg
        .split("Line: ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let col = msg
        .split("Column: ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (line, col)
}

struct Compiler<'s, 'a> {
    scope: &'s mut Scope<'a>,
    diags: &'s mut Vec<Diagnostic>,
}

impl Compiler<'_, '_> {
    fn err(&mut self, node: &impl Spanned, code: &'static str, msg: String) -> Expr {
        let s = node.span().start;
        self.diags.push(Diagnostic::new(code, msg).at(s.line, s.column));
        Expr::Lit(Value::Null)
    }

    fn expr(&mut self, e: &ast::Expr) -> Expr {
        use ast::Expr as A;
        match e {
            A::Nested(inner) => self.expr(inner),
            A::Value(v) => self.literal(v),
            A::Identifier(id) => self.name(std::slice::from_ref(id), e),
            A::CompoundIdentifier(ids) => self.name(ids, e),
            A::UnaryOp { op, expr } => match op {
                UnaryOperator::Not => Expr::Not(Box::new(self.expr(expr))),
                UnaryOperator::Minus => match self.expr(expr) {
                    Expr::Lit(Value::Int(i)) => Expr::Lit(Value::Int(-i)),
                    Expr::Lit(Value::Float(f)) => Expr::Lit(Value::Float(-f)),
                    other => Expr::Neg(Box::new(other)),
                },
                UnaryOperator::Plus => self.expr(expr),
                other => self.err(e, "E101", format!("unsupported operator `{other}`")),
            },
            A::BinaryOp { left, op, right } => {
                let (l, r) = (self.expr(left), self.expr(right));
                let cmp = |op| Expr::Cmp(op, Box::new(l.clone()), Box::new(r.clone()));
                let ar = |op| Expr::Arith(op, Box::new(l.clone()), Box::new(r.clone()));
                match op {
                    BinaryOperator::And => flatten(true, l, r),
                    BinaryOperator::Or => flatten(false, l, r),
                    BinaryOperator::Eq => cmp(CmpOp::Eq),
                    BinaryOperator::NotEq => cmp(CmpOp::Ne),
                    BinaryOperator::Lt => cmp(CmpOp::Lt),
                    BinaryOperator::LtEq => cmp(CmpOp::Le),
                    BinaryOperator::Gt => cmp(CmpOp::Gt),
                    BinaryOperator::GtEq => cmp(CmpOp::Ge),
                    BinaryOperator::Plus => ar(ArithOp::Add),
                    BinaryOperator::Minus => ar(ArithOp::Sub),
                    BinaryOperator::Multiply => ar(ArithOp::Mul),
                    BinaryOperator::Divide => ar(ArithOp::Div),
                    BinaryOperator::Modulo => ar(ArithOp::Mod),
                    BinaryOperator::StringConcat => Expr::Concat(Box::new(l), Box::new(r)),
                    other => self.err(e, "E101", format!("unsupported operator `{other}`")),
                }
            }
            A::IsNull(x) => Expr::IsNull { expr: Box::new(self.expr(x)), negated: false },
            A::IsNotNull(x) => Expr::IsNull { expr: Box::new(self.expr(x)), negated: true },
            A::IsTrue(x) => Expr::Cmp(CmpOp::Eq, Box::new(self.expr(x)), Box::new(Expr::Lit(Value::Bool(true)))),
            A::IsFalse(x) => Expr::Cmp(CmpOp::Eq, Box::new(self.expr(x)), Box::new(Expr::Lit(Value::Bool(false)))),
            A::InList { expr, list, negated } => Expr::InList {
                expr: Box::new(self.expr(expr)),
                list: list.iter().map(|x| self.expr(x)).collect(),
                negated: *negated,
            },
            A::Between { expr, negated, low, high } => Expr::Between {
                expr: Box::new(self.expr(expr)),
                low: Box::new(self.expr(low)),
                high: Box::new(self.expr(high)),
                negated: *negated,
            },
            A::Like { negated, expr, pattern, escape_char, any } => {
                if escape_char.is_some() || *any {
                    return self.err(e, "E101", "LIKE supports only `%` and `_` (no ESCAPE, no ANY)".into());
                }
                Expr::Like { expr: Box::new(self.expr(expr)), pattern: Box::new(self.expr(pattern)), negated: *negated }
            }
            A::Case { operand, conditions, else_result, .. } => Expr::Case {
                operand: operand.as_ref().map(|o| Box::new(self.expr(o))),
                whens: conditions.iter().map(|w| (self.expr(&w.condition), self.expr(&w.result))).collect(),
                otherwise: else_result.as_ref().map(|o| Box::new(self.expr(o))),
            },
            A::Floor { expr, field } | A::Ceil { expr, field } => {
                let f = if matches!(e, A::Floor { .. }) { Func::Floor } else { Func::Ceil };
                match field {
                    CeilFloorKind::DateTimeField(ast::DateTimeField::NoDateTime) => {
                        Expr::Call(f, vec![self.expr(expr)])
                    }
                    _ => self.err(e, "E101", "FLOOR/CEIL take one numeric argument".into()),
                }
            }
            A::Function(func) => self.function(func, e),
            other => self.err(other, "E101", format!("unsupported expression `{other}`")),
        }
    }

    fn literal(&mut self, v: &ast::ValueWithSpan) -> Expr {
        match &v.value {
            ast::Value::Number(n, _) => {
                if let Ok(i) = n.parse::<i64>() {
                    Expr::Lit(Value::Int(i))
                } else if let Ok(f) = n.parse::<f64>() {
                    Expr::Lit(Value::Float(f))
                } else {
                    self.err(v, "E102", format!("invalid number `{n}`"))
                }
            }
            ast::Value::SingleQuotedString(s) => Expr::Lit(Value::str(s)),
            ast::Value::Boolean(b) => Expr::Lit(Value::Bool(*b)),
            ast::Value::Null => Expr::Lit(Value::Null),
            ast::Value::DoubleQuotedString(s) => self.err(
                v,
                "E102",
                format!("\"{s}\" is a quoted name, not a string; strings use single quotes: '{s}'"),
            ),
            other => self.err(v, "E102", format!("unsupported literal `{other}`")),
        }
    }

    fn name(&mut self, ids: &[ast::Ident], node: &ast::Expr) -> Expr {
        let first = ids[0].value.as_str();
        if ids.len() == 1 && first.eq_ignore_ascii_case("event_time") {
            return Expr::EventTime;
        }
        if let Some(kind) = self.scope.containers.get(first) {
            return self.err(
                node,
                "E103",
                format!("`{first}` is {kind} stage and cannot be referenced; refer to its inner stages"),
            );
        }
        if let Some(&leaf) = self.scope.leaves.get(first) {
            if !self.scope.stages_allowed {
                return self.err(node, "E104", format!("`{first}` is a stage; a rule filter cannot refer to stages"));
            }
            if ids.len() == 1 {
                return self.err(
                    node,
                    "E105",
                    format!("`{first}` is a stage, not a value; write `{first}.field` or an aggregate such as COUNT({first})"),
                );
            }
            let path = ids[1..].iter().map(|i| i.value.as_str()).collect::<Vec<_>>().join(".");
            let f = self.scope.registry.intern(&path);
            let id = self.scope.agg(AggSpec { stage: leaf, kind: AggKind::Last(f, 0) });
            return Expr::Agg(id);
        }
        let path = ids.iter().map(|i| i.value.as_str()).collect::<Vec<_>>().join(".");
        self.scope.fields_read.push(path.clone());
        Expr::Field(self.scope.registry.intern(&path))
    }

    fn function(&mut self, func: &ast::Function, node: &ast::Expr) -> Expr {
        let name = match func.name.0.as_slice() {
            [ObjectNamePart::Identifier(i)] => i.value.to_ascii_uppercase(),
            _ => return self.err(node, "E106", format!("unknown function `{}`", func.name)),
        };
        let args: Vec<&ast::Expr> = match &func.args {
            FunctionArguments::List(l) => {
                if l.duplicate_treatment.is_some() || !l.clauses.is_empty() {
                    return self.err(node, "E106", format!("{name}: DISTINCT and clauses are not supported"));
                }
                let mut out = Vec::new();
                for a in &l.args {
                    match a {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) => out.push(x),
                        _ => return self.err(node, "E106", format!("{name}: only plain arguments are supported")),
                    }
                }
                out
            }
            FunctionArguments::None => Vec::new(),
            FunctionArguments::Subquery(_) => return self.err(node, "E106", "subqueries are not supported".into()),
        };
        let scalar = |name: &str| -> Option<(Func, usize, usize)> {
            Some(match name {
                "LOWER" => (Func::Lower, 1, 1),
                "UPPER" => (Func::Upper, 1, 1),
                "LENGTH" => (Func::Length, 1, 1),
                "ABS" => (Func::Abs, 1, 1),
                "ROUND" => (Func::Round, 1, 2),
                "FLOOR" => (Func::Floor, 1, 1),
                "CEIL" | "CEILING" => (Func::Ceil, 1, 1),
                "COALESCE" => (Func::Coalesce, 1, usize::MAX),
                "STARTS_WITH" => (Func::StartsWith, 2, 2),
                "CONTAINS" => (Func::Contains, 2, 2),
                _ => return None,
            })
        };
        if let Some((f, lo, hi)) = scalar(&name) {
            if args.len() < lo || args.len() > hi {
                return self.err(node, "E107", format!("{name} takes {} argument(s), got {}", if lo == hi { lo.to_string() } else if hi == usize::MAX { format!("{lo} or more") } else { format!("{lo} to {hi}") }, args.len()));
            }
            return Expr::Call(f, args.iter().map(|a| self.expr(a)).collect());
        }
        let agg = matches!(name.as_str(), "COUNT" | "SUM" | "AVG" | "MIN" | "MAX" | "FIRST" | "LAST");
        if !agg {
            return self.err(node, "E106", format!("unknown function `{name}` (LOWER, UPPER, LENGTH, ABS, ROUND, FLOOR, CEIL, COALESCE, STARTS_WITH, CONTAINS, COUNT, SUM, AVG, MIN, MAX, FIRST, LAST)"));
        }
        if !self.scope.stages_allowed {
            return self.err(node, "E104", format!("{name}: a rule filter cannot aggregate over stages"));
        }
        // Aggregates: first argument names a stage (COUNT) or stage.field.
        let Some(first) = args.first() else {
            return self.err(node, "E107", format!("{name} needs a stage argument"));
        };
        let ids: Vec<ast::Ident> = match first {
            ast::Expr::Identifier(i) => vec![i.clone()],
            ast::Expr::CompoundIdentifier(v) => v.clone(),
            other => return self.err(*other, "E108", format!("{name} takes a stage reference such as `stage.field`")),
        };
        let sname = ids[0].value.as_str();
        if let Some(kind) = self.scope.containers.get(sname) {
            return self.err(*first, "E103", format!("`{sname}` is {kind} stage and cannot be referenced; refer to its inner stages"));
        }
        let Some(&leaf) = self.scope.leaves.get(sname) else {
            return self.err(*first, "E109", format!("unknown stage `{sname}` in {name}(...)"));
        };
        if name == "COUNT" {
            if ids.len() != 1 || args.len() != 1 {
                return self.err(node, "E107", "COUNT takes one stage name: COUNT(stage)".into());
            }
            let id = self.scope.agg(AggSpec { stage: leaf, kind: AggKind::Count });
            return Expr::Agg(id);
        }
        if ids.len() < 2 {
            return self.err(*first, "E108", format!("{name} needs a field: {name}({sname}.field)"));
        }
        let path = ids[1..].iter().map(|i| i.value.as_str()).collect::<Vec<_>>().join(".");
        let f = self.scope.registry.intern(&path);
        let kind = match (name.as_str(), args.len()) {
            ("SUM", 1) => AggKind::Sum(f),
            ("AVG", 1) => AggKind::Avg(f),
            ("MIN", 1) => AggKind::Min(f),
            ("MAX", 1) => AggKind::Max(f),
            ("FIRST", 1) => AggKind::First(f),
            ("LAST", 1) => AggKind::Last(f, 0),
            ("LAST", 2) => match args[1] {
                ast::Expr::Value(ast::ValueWithSpan { value: ast::Value::Number(n, _), .. }) => match n.parse::<u32>() {
                    Ok(n) => AggKind::Last(f, n),
                    Err(_) => return self.err(args[1], "E107", "LAST(stage.f, n): n must be a non-negative integer".into()),
                },
                other => return self.err(other, "E107", "LAST(stage.f, n): n must be an integer literal".into()),
            },
            _ => return self.err(node, "E107", format!("{name} takes one argument ({name}(stage.field))")),
        };
        let id = self.scope.agg(AggSpec { stage: leaf, kind });
        Expr::Agg(id)
    }
}

fn flatten(and: bool, l: Expr, r: Expr) -> Expr {
    let mut v = Vec::new();
    for e in [l, r] {
        match (and, e) {
            (true, Expr::And(inner)) => v.extend(inner),
            (false, Expr::Or(inner)) => v.extend(inner),
            (_, e) => v.push(e),
        }
    }
    if and {
        Expr::And(v)
    } else {
        Expr::Or(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns() {
        assert!(like("hello", "h%o"));
        assert!(like("hello", "h_llo"));
        assert!(!like("hello", "h_lo"));
        assert!(like("", "%"));
        assert!(like("abc", "%c"));
    }

    #[test]
    fn arithmetic_semantics() {
        assert_eq!(arith(ArithOp::Div, &Value::Int(7), &Value::Int(2)), Value::Int(3));
        assert_eq!(arith(ArithOp::Div, &Value::Int(7), &Value::Int(0)), Value::Null);
        assert_eq!(arith(ArithOp::Add, &Value::Int(1), &Value::Float(0.5)), Value::Float(1.5));
        assert_eq!(arith(ArithOp::Add, &Value::str("a"), &Value::Int(1)), Value::Null);
    }
}
