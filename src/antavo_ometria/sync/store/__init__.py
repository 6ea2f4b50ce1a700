"""The state store: what Ometria accepted, what is owed or held, runs, event cursors; its migrations."""
