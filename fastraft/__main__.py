from fastraft.cli import main

if __name__ == "__main__":
    main()
