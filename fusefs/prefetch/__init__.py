"""Read-ahead driven by what files say they need next: a program's libraries, a module's imports."""
