"""The terminal front end (prompt_toolkit): the loop, slash commands, rendering, the toolbar."""
