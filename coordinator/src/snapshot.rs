//! Copying redb tables into another file inside one read transaction: how a store
//! hands a consistent copy of itself to a backup (`crate::backup`) while it keeps
//! serving. A read transaction sees one commit, whatever is written meanwhile.

use redb::{ReadTransaction, ReadableTable, TableDefinition, TableHandle, WriteTransaction};

/// A copy that failed: the table and redb's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("copying table {table}: {message}")]
pub struct CopyError {
    pub table: String,
    pub message: String,
}

/// Copies every row of `table` as `from` sees it into the same table of `to`; a table
/// `from` does not have is copied as empty. Returns the rows copied.
pub fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    from: &ReadTransaction,
    to: &WriteTransaction,
    table: TableDefinition<K, V>,
) -> Result<u64, CopyError> {
    let fail = |e: &dyn std::fmt::Display| CopyError {
        table: table.name().to_owned(),
        message: e.to_string(),
    };
    let mut dest = to.open_table(table).map_err(|e| fail(&e))?;
    let source = match from.open_table(table) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(fail(&e)),
    };
    let mut rows = 0;
    for row in source.iter().map_err(|e| fail(&e))? {
        let (k, v) = row.map_err(|e| fail(&e))?;
        dest.insert(k.value(), v.value()).map_err(|e| fail(&e))?;
        rows += 1;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_the_commit_the_read_saw() {
        const T: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("t");
        const MISSING: TableDefinition<u64, u64> = TableDefinition::new("missing");
        let dir = tempfile::tempdir().unwrap();
        let src = redb::Database::create(dir.path().join("a.redb")).unwrap();
        let w = src.begin_write().unwrap();
        w.open_table(T)
            .unwrap()
            .insert((1, "e"), b"x".as_slice())
            .unwrap();
        w.commit().unwrap();
        let read = src.begin_read().unwrap();
        // Written after the read began: not in the copy.
        let w = src.begin_write().unwrap();
        w.open_table(T)
            .unwrap()
            .insert((2, "e"), b"y".as_slice())
            .unwrap();
        w.commit().unwrap();
        let dst = redb::Database::create(dir.path().join("b.redb")).unwrap();
        let w = dst.begin_write().unwrap();
        assert_eq!(copy_table(&read, &w, T).unwrap(), 1);
        assert_eq!(copy_table(&read, &w, MISSING).unwrap(), 0);
        w.commit().unwrap();
        let r = dst.begin_read().unwrap();
        let t = r.open_table(T).unwrap();
        assert_eq!(t.get((1, "e")).unwrap().unwrap().value(), b"x");
        assert!(t.get((2, "e")).unwrap().is_none());
    }
}
