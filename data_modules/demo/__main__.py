"""``python -m data_modules.demo``: build the demo cohort."""

from data_modules.demo.build import main

if __name__ == "__main__":
    main()
