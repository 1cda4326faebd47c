-- A commit is written as one statement (each write a data-modifying CTE, storage/commit.rs
-- `Combined`): a version-checked write passes its row count here, and anything but one raises,
-- which undoes the whole statement. SQLSTATE SC409 tells the registry it was a concurrent change.
CREATE FUNCTION socialcard_one_row(changed BIGINT) RETURNS BIGINT LANGUAGE plpgsql AS $$
BEGIN
    IF changed <> 1 THEN
        RAISE EXCEPTION 'version conflict: % rows changed where one was expected', changed
            USING ERRCODE = 'SC409';
    END IF;
    RETURN changed;
END
$$;
