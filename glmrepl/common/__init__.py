"""Small helpers every part of glmrepl may use: atomic writes, units, its folders. They import nothing of glmrepl."""
