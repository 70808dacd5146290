"""Drop-in classes that mirror other libraries' constructors, call shapes and return types."""
