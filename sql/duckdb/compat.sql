-- DataFusion function names the shipped views use that DuckDB spells differently; created as macros
-- in every embedded DuckDB session so sql/views/*.sql run unchanged on both engines.
CREATE MACRO array_element(l, i) AS list_extract(l, i);
