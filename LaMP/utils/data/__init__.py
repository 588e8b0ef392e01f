"""Reading and writing LaMP files: questions, outputs, the bounded JSON reader, the output
policy (atomic writes, inputs never overwritten), users, and the Avocado builder."""
