"""Generation backends behind one small interface; each is imported only when chosen."""
