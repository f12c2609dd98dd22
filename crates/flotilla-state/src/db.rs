//! The two databases behind one small interface: a transaction that runs SQL with numbered
//! parameters (`$1`, `$2`, ...) and gives rows of integers and text. The state's queries are
//! written once, in the SQL both SQLite and PostgreSQL speak; only the migrations differ per
//! dialect. Every write is one transaction: on SQLite an immediate one (writers queue on the
//! file), on PostgreSQL a SERIALIZABLE one retried when the server reports a conflict, so two
//! deployers racing for a lock, or for the next generation, cannot both win.

use std::time::Duration;

use postgres::error::SqlState;
use postgres::types::{IsNull, ToSql, Type};
use rusqlite::types::{ToSqlOutput, ValueRef};

use crate::{Result, StateError};

/// A parameter or a column value: all the state stores is integers, text and NULL.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Val {
    Null,
    Int(i64),
    Text(String),
}

impl From<i64> for Val {
    fn from(v: i64) -> Val {
        Val::Int(v)
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Val {
        Val::Text(v.to_owned())
    }
}
impl From<&String> for Val {
    fn from(v: &String) -> Val {
        Val::Text(v.clone())
    }
}
impl From<String> for Val {
    fn from(v: String) -> Val {
        Val::Text(v)
    }
}
impl From<std::borrow::Cow<'_, str>> for Val {
    fn from(v: std::borrow::Cow<'_, str>) -> Val {
        Val::Text(v.into_owned())
    }
}
impl<T: Into<Val>> From<Option<T>> for Val {
    fn from(v: Option<T>) -> Val {
        v.map_or(Val::Null, Into::into)
    }
}

/// Parameters, as `params![a, b]`.
macro_rules! params {
    ($($v:expr),* $(,)?) => { &[$($crate::db::Val::from($v)),*][..] };
}
pub(crate) use params;

/// One result row.
#[derive(Debug, Clone)]
pub(crate) struct Row(Vec<Val>);

impl Row {
    pub(crate) fn int(&self, i: usize) -> Result<i64> {
        self.opt_int(i)?.ok_or_else(|| StateError::Column { index: i, want: "integer" })
    }
    pub(crate) fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        match self.0.get(i) {
            Some(Val::Int(v)) => Ok(Some(*v)),
            Some(Val::Null) => Ok(None),
            _ => Err(StateError::Column { index: i, want: "integer" }),
        }
    }
    pub(crate) fn text(&self, i: usize) -> Result<String> {
        self.opt_text(i)?.ok_or_else(|| StateError::Column { index: i, want: "text" })
    }
    pub(crate) fn opt_text(&self, i: usize) -> Result<Option<String>> {
        match self.0.get(i) {
            Some(Val::Text(v)) => Ok(Some(v.clone())),
            Some(Val::Null) => Ok(None),
            _ => Err(StateError::Column { index: i, want: "text" }),
        }
    }
}

/// A transaction on either database.
pub(crate) trait Tx {
    /// Runs a statement; the number of rows it changed.
    fn execute(&mut self, sql: &str, params: &[Val]) -> Result<u64>;
    /// Runs a query; its rows.
    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>>;
    /// Runs several statements without parameters (migrations).
    fn batch(&mut self, sql: &str) -> Result<()>;
    /// The time a lease is written and judged by, in seconds since the epoch: PostgreSQL's
    /// own clock (shared by every deployer, so their clocks do not matter), and `local` (this
    /// host's clock) on SQLite, which only this host's processes open.
    fn lease_clock(&mut self, local: i64) -> Result<i64>;

    /// The first row, if any.
    fn query_opt(&mut self, sql: &str, params: &[Val]) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
    /// Exactly one row.
    fn query_one(&mut self, sql: &str, params: &[Val]) -> Result<Row> {
        self.query_opt(sql, params)?.ok_or(StateError::NoRow)
    }
}

/// An open connection.
pub(crate) enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(Box<postgres::Client>),
}

/// How many times a PostgreSQL transaction that lost a serialization conflict is run again.
const RETRIES: u32 = 20;

impl Conn {
    /// Runs `f` in one write transaction, committed when it returns `Ok` and rolled back
    /// otherwise. On PostgreSQL `f` may run more than once: it must do nothing but SQL.
    pub(crate) fn write<T>(&mut self, mut f: impl FnMut(&mut dyn Tx) -> Result<T>) -> Result<T> {
        match self {
            Conn::Sqlite(c) => {
                let mut tx = SqliteTx(c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?);
                let out = f(&mut tx)?;
                tx.0.commit()?;
                Ok(out)
            }
            Conn::Postgres(c) => {
                let mut attempt = 0;
                loop {
                    let result = (|| {
                        let mut tx = PgTx(c.build_transaction().isolation_level(postgres::IsolationLevel::Serializable).start()?);
                        let out = f(&mut tx)?;
                        tx.0.commit()?;
                        Ok(out)
                    })();
                    match result {
                        Err(StateError::Postgres(e)) if attempt < RETRIES && is_conflict(&e) => {
                            attempt += 1;
                            // Back off a little, by a different amount in each process.
                            let jitter = u64::from(std::process::id() % 7) + u64::from(attempt);
                            std::thread::sleep(Duration::from_millis(5 * jitter));
                        }
                        other => return other,
                    }
                }
            }
        }
    }

    /// Runs `f` in a read-only transaction: it sees one committed snapshot, and never waits
    /// for a writer.
    pub(crate) fn read<T>(&mut self, f: impl FnOnce(&mut dyn Tx) -> Result<T>) -> Result<T> {
        match self {
            Conn::Sqlite(c) => {
                let mut tx = SqliteTx(c.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?);
                let out = f(&mut tx)?;
                tx.0.commit()?;
                Ok(out)
            }
            Conn::Postgres(c) => {
                let mut tx = PgTx(c.build_transaction().isolation_level(postgres::IsolationLevel::RepeatableRead).read_only(true).start()?);
                let out = f(&mut tx)?;
                tx.0.commit()?;
                Ok(out)
            }
        }
    }
}

/// Whether PostgreSQL gave up on a transaction because of a concurrent one (a serialization
/// failure or a deadlock): it is run again. A unique violation is not one of them: it is a
/// real error (the lock's insert races with `ON CONFLICT`, so a race is not a violation there).
fn is_conflict(e: &postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED)
}

struct SqliteTx<'a>(rusqlite::Transaction<'a>);

/// SQLite reads `$1` as a named parameter; `?1` is its numbered one.
fn sqlite_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Val::Null => ToSqlOutput::Owned(rusqlite::types::Value::Null),
            Val::Int(v) => ToSqlOutput::Owned(rusqlite::types::Value::Integer(*v)),
            Val::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
        })
    }
}

impl Tx for SqliteTx<'_> {
    fn lease_clock(&mut self, local: i64) -> Result<i64> {
        Ok(local)
    }

    fn execute(&mut self, sql: &str, params: &[Val]) -> Result<u64> {
        let mut stmt = self.0.prepare_cached(&sqlite_sql(sql))?;
        Ok(stmt.execute(rusqlite::params_from_iter(params))? as u64)
    }

    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>> {
        let mut stmt = self.0.prepare_cached(&sqlite_sql(sql))?;
        let n = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(n);
            for i in 0..n {
                row.push(match r.get_ref(i)? {
                    ValueRef::Null => Val::Null,
                    ValueRef::Integer(v) => Val::Int(v),
                    ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Real(_) | ValueRef::Blob(_) => return Err(StateError::Column { index: i, want: "integer or text" }),
                });
            }
            out.push(Row(row));
        }
        Ok(out)
    }

    fn batch(&mut self, sql: &str) -> Result<()> {
        Ok(self.0.execute_batch(sql)?)
    }
}

struct PgTx<'a>(postgres::Transaction<'a>);

impl ToSql for Val {
    fn to_sql(&self, ty: &Type, out: &mut postgres::types::private::BytesMut) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Val::Null => Ok(IsNull::Yes),
            Val::Int(v) => v.to_sql(ty, out),
            Val::Text(v) => v.as_str().to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <i64 as ToSql>::accepts(ty) || <&str as ToSql>::accepts(ty)
    }

    postgres::types::to_sql_checked!();
}

impl Tx for PgTx<'_> {
    fn lease_clock(&mut self, _local: i64) -> Result<i64> {
        Ok(self.0.query_one("SELECT CAST(floor(extract(epoch FROM now())) AS BIGINT)", &[])?.get(0))
    }

    fn execute(&mut self, sql: &str, params: &[Val]) -> Result<u64> {
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        Ok(self.0.execute(sql, &refs)?)
    }

    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>> {
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let rows = self.0.query(sql, &refs)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let mut row = Vec::with_capacity(r.len());
            for (i, col) in r.columns().iter().enumerate() {
                let ty = col.type_();
                row.push(if *ty == Type::INT8 {
                    r.try_get::<_, Option<i64>>(i)?.map_or(Val::Null, Val::Int)
                } else if *ty == Type::INT4 {
                    r.try_get::<_, Option<i32>>(i)?.map_or(Val::Null, |v| Val::Int(v.into()))
                } else if *ty == Type::INT2 {
                    r.try_get::<_, Option<i16>>(i)?.map_or(Val::Null, |v| Val::Int(v.into()))
                } else if *ty == Type::BOOL {
                    r.try_get::<_, Option<bool>>(i)?.map_or(Val::Null, |v| Val::Int(v.into()))
                } else {
                    r.try_get::<_, Option<String>>(i)?.map_or(Val::Null, Val::Text)
                });
            }
            out.push(Row(row));
        }
        Ok(out)
    }

    fn batch(&mut self, sql: &str) -> Result<()> {
        Ok(self.0.batch_execute(sql)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_parameters_become_sqlite_ones_and_nothing_else_changes() {
        assert_eq!(sqlite_sql("SELECT $1, '$', $12 FROM t WHERE a = $2"), "SELECT ?1, '$', ?12 FROM t WHERE a = ?2");
    }
}
