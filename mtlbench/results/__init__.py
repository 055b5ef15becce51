"""What reads run records: the store, the typed record, the leaderboard, statistics (pure), reports, plots and
`compare`. Needs neither torch nor the method registry: a leaderboard regenerates from the records alone."""
