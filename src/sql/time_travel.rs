//! Time travel in SQL: `as_of('table', 'version or time')` reads a lake table as it was at a Delta
//! version (`3`) or an instant (`'2026-12-01'`, `'2026-12-01T06:00:00Z'`).
//!
//! DataFusion calls table functions synchronously while planning, but loading a Delta snapshot is
//! I/O. So before a statement is planned, [`AsOfTables::prepare`] finds its `as_of(…)` calls in the
//! syntax tree and loads each snapshot; the function then only looks them up.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use datafusion::catalog::{Session, TableFunctionImpl, TableProvider};
use datafusion::common::{plan_err, ScalarValue};
use datafusion::logical_expr::Expr;
use datafusion::sql::parser::Statement;
use datafusion::sql::sqlparser::ast::{TableFactor, Visit, Visitor};

use crate::lake::delta::AsOf;
use crate::lake::{Lake, LakeError};

/// Name of the table function.
pub const NAME: &str = "as_of";

/// Snapshots loaded for the statements of a session, by (table, version or time as written).
#[derive(Debug, Default)]
pub struct AsOfTables {
    loaded: Mutex<HashMap<(String, AsOf), Arc<dyn TableProvider>>>,
}

/// `'text'` → `text` (a SQL string literal as written), numbers as they are.
fn unquote(s: &str) -> String {
    let s = s.trim();
    match s.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        Some(inner) => inner.replace("''", "'"),
        None => s.to_string(),
    }
}

fn key(table: &str, at: &str) -> Result<(String, AsOf), String> {
    let at: AsOf = at.parse()?;
    Ok((table.to_string(), at))
}

impl AsOfTables {
    /// Load the snapshot of every `as_of(table, at)` call in `stmt`.
    pub async fn prepare(
        &self,
        lake: &Lake,
        stmt: &Statement,
        session: &dyn Session,
    ) -> Result<(), LakeError> {
        struct Calls(Vec<Vec<String>>);
        impl Visitor for Calls {
            type Break = ();
            fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
                if let TableFactor::Table {
                    name,
                    args: Some(args),
                    ..
                } = t
                {
                    if name.to_string().eq_ignore_ascii_case(NAME) {
                        self.0
                            .push(args.args.iter().map(|a| unquote(&a.to_string())).collect());
                    }
                }
                ControlFlow::Continue(())
            }
        }
        let Statement::Statement(inner) = stmt else {
            return Ok(());
        };
        let mut calls = Calls(Vec::new());
        let _ = inner.visit(&mut calls);
        for args in calls.0 {
            let [table, at] = args.as_slice() else {
                continue; // the function itself explains the arity
            };
            let Ok(k) = key(table, at) else {
                continue; // and a malformed version or time
            };
            if self
                .loaded
                .lock()
                .map(|m| m.contains_key(&k))
                .unwrap_or(false)
            {
                continue;
            }
            let provider =
                lake.provider(table, &k.1, session)
                    .await?
                    .ok_or_else(|| LakeError::NoTable {
                        table: table.clone(),
                    })?;
            if let Ok(mut m) = self.loaded.lock() {
                m.insert(k, provider);
            }
        }
        Ok(())
    }
}

/// The `as_of` table function over a session's [`AsOfTables`].
#[derive(Debug)]
pub struct AsOfFunction(pub Arc<AsOfTables>);

impl TableFunctionImpl for AsOfFunction {
    fn call(&self, args: &[Expr]) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let text = |e: &Expr| match e {
            Expr::Literal(ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)), _) => {
                Some(s.clone())
            }
            Expr::Literal(v, _) if !v.is_null() => Some(v.to_string()),
            _ => None,
        };
        let (Some(table), Some(at)) = (args.first().and_then(text), args.get(1).and_then(text))
        else {
            return plan_err!(
                "{NAME} takes a table name and a version or time, e.g. {NAME}('mitre_attack_techniques', 3) or {NAME}('otx_log', '2026-12-01T06:00:00Z')"
            );
        };
        if args.len() != 2 {
            return plan_err!(
                "{NAME} takes exactly two arguments: a table name and a version or time"
            );
        }
        let k = match key(&table, &at) {
            Ok(k) => k,
            Err(e) => return plan_err!("{NAME}('{table}', …): {e}"),
        };
        match self.0.loaded.lock().ok().and_then(|m| m.get(&k).cloned()) {
            Some(p) => Ok(p),
            None => plan_err!(
                "{NAME}('{table}', '{at}') could not be loaded; use it in a query's FROM clause with literal arguments"
            ),
        }
    }
}
